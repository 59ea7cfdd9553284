// Decode attention over paged KV, reading pages in place (no gather copy).
//
// One query token per sequence. Work is split over (sequence, kv head) pairs across the intra-op
// threads; each pair reads its K rows once for all the query heads that share that KV head, then
// its V rows once. Scores and accumulation are fp32; q, the cache and the output may be bf16 or
// fp32. A bf16 cache with head_dim a multiple of 32 takes an AVX-512 BF16 path (dot products
// with vdpbf16ps, V rows widened in registers); anything else the portable loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using xllm::from_f32;
using xllm::to_f32;

struct Layout {
  int64_t B, H, D, KVH, G, PS, P, head_stride, page_stride;
};

// Softmax over each of the G score rows in place (n scores per row).
inline void softmax_rows(float* scores, int64_t G, int64_t n) {
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict sg = scores + g * n;
    float mx = -std::numeric_limits<float>::max();
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sg[i]);
    float sum = 0.f;
    // A simd loop lets the compiler use the vector expf from glibc's libmvec.
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - mx); sum += sg[i]; }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
  }
}

inline float cap_score(float s, double soft_cap) {
  return soft_cap > 0 ? static_cast<float>(std::tanh(s / soft_cap) * soft_cap) : s;
}

// Walks positions [start, len) one page run at a time: f(first position, page id, offset in the
// page, run length). Position -> (page, offset) costs an integer division, which per row and per
// head was the kernel's single largest cost; per run it is noise.
template <typename F>
inline void for_each_run(int64_t start, int64_t len, int64_t page_size, const int64_t* pages, F&& f) {
  for (int64_t t = start; t < len;) {
    const int64_t page = t / page_size, off = t - page * page_size;
    const int64_t run = std::min(page_size - off, len - t);
    f(t, pages[page], off, run);
    t += run;
  }
}

// Portable path: any dtype, any head_dim.
template <typename TQ, typename TC>
void decode_generic(const TQ* qp, const TC* kp, const TC* vp, const int64_t* pg, const int64_t* ln, TQ* op,
                    const Layout& L, double scale, int64_t window, double soft_cap) {
  at::parallel_for(0, L.B * L.KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(L.G * L.D), row(L.D), acc(L.G * L.D);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / L.KVH, h = work % L.KVH;
      const int64_t len = ln[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      scores.assign(L.G * n, 0.f);
      for (int64_t i = 0; i < L.G * L.D; ++i) qf[i] = to_f32(qp[(b * L.H + h * L.G) * L.D + i]);
      for_each_run(start, len, L.PS, pg + b * L.P, [&](int64_t t0, int64_t page, int64_t off, int64_t run) {
        for (int64_t t = t0; t < t0 + run; ++t) {
          const TC* krow = kp + h * L.head_stride + page * L.page_stride + (off + t - t0) * L.D;
          float* __restrict r = row.data();
#pragma omp simd
          for (int64_t d = 0; d < L.D; ++d) r[d] = to_f32(krow[d]);
          for (int64_t g = 0; g < L.G; ++g) {
            const float* __restrict qg = qf.data() + g * L.D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < L.D; ++d) s += qg[d] * r[d];
            scores[g * n + (t - start)] = cap_score(s * static_cast<float>(scale), soft_cap);
          }
        }
      });
      softmax_rows(scores.data(), L.G, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_run(start, len, L.PS, pg + b * L.P, [&](int64_t t0, int64_t page, int64_t off, int64_t run) {
        for (int64_t t = t0; t < t0 + run; ++t) {
          const TC* vrow = vp + h * L.head_stride + page * L.page_stride + (off + t - t0) * L.D;
          float* __restrict r = row.data();
#pragma omp simd
          for (int64_t d = 0; d < L.D; ++d) r[d] = to_f32(vrow[d]);
          for (int64_t g = 0; g < L.G; ++g) {
            const float p = scores[g * n + (t - start)];
            float* __restrict og = acc.data() + g * L.D;
#pragma omp simd
            for (int64_t d = 0; d < L.D; ++d) og[d] += p * r[d];
          }
        }
      });
      TQ* ob = op + (b * L.H + h * L.G) * L.D;
      for (int64_t i = 0; i < L.G * L.D; ++i) ob[i] = from_f32<TQ>(acc[i]);
    }
  });
}

inline __m512 widen_bf16(const c10::BFloat16* p) {
  // bf16 -> fp32 is a 16-bit left shift of each lane.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Horizontal sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a,b,a,b per 128-bit lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a,b,c,d per lane
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// bf16 cache, bf16 q/out, head_dim = 32 * DC (DC <= 4 chunks, i.e. head_dim <= 128).
template <int DC>
void decode_bf16(const c10::BFloat16* qp, const c10::BFloat16* kp, const c10::BFloat16* vp, const int64_t* pg,
                 const int64_t* ln, c10::BFloat16* op, const Layout& L, double scale, int64_t window,
                 double soft_cap) {
  constexpr int64_t D = 32 * DC;
  at::parallel_for(0, L.B * L.KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / L.KVH, h = work % L.KVH;
      const int64_t len = ln[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      scores.resize(L.G * n);
      const c10::BFloat16* qb = qp + (b * L.H + h * L.G) * D;
      const c10::BFloat16* kbase = kp + h * L.head_stride;
      const c10::BFloat16* vbase = vp + h * L.head_stride;
      const int64_t* pages = pg + b * L.P;
      const float fscale = static_cast<float>(scale);
      for (int64_t g = 0; g < L.G; ++g) {
        __m512bh qv[DC];
        for (int c = 0; c < DC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qb + g * D + 32 * c);
        float* sg = scores.data() + g * n;
        auto dot = [&](const c10::BFloat16* krow) {
          __m512 a = _mm512_setzero_ps();
          for (int c = 0; c < DC; ++c) a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(krow + 32 * c));
          return a;
        };
        for_each_run(start, len, L.PS, pages, [&](int64_t t0, int64_t page, int64_t off, int64_t run) {
          const c10::BFloat16* k0 = kbase + page * L.page_stride + off * D;
          float* out = sg + (t0 - start);
          int64_t i = 0;
          // Four positions at a time share one horizontal reduction (a third of the shuffles).
          for (; i + 4 <= run; i += 4) {
            const c10::BFloat16* k = k0 + i * D;
            const __m128 s4 = hsum4(dot(k), dot(k + D), dot(k + 2 * D), dot(k + 3 * D));
            _mm_storeu_ps(out + i, _mm_mul_ps(s4, _mm_set1_ps(fscale)));
          }
          for (; i < run; ++i) out[i] = _mm512_reduce_add_ps(dot(k0 + i * D)) * fscale;
        });
        if (soft_cap > 0)
          for (int64_t i = 0; i < n; ++i) sg[i] = cap_score(sg[i], soft_cap);
      }
      softmax_rows(scores.data(), L.G, n);
      c10::BFloat16* ob = op + (b * L.H + h * L.G) * D;
      // One query head at a time keeps its accumulator in registers; the V rows of this
      // (sequence, kv head) stay in L1/L2 between the G passes.
      for (int64_t g = 0; g < L.G; ++g) {
        __m512 acc[2 * DC];
        for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm512_setzero_ps();
        const float* sg = scores.data() + g * n;
        for_each_run(start, len, L.PS, pages, [&](int64_t t0, int64_t page, int64_t off, int64_t run) {
          const c10::BFloat16* v0 = vbase + page * L.page_stride + off * D;
          const float* p0 = sg + (t0 - start);
          for (int64_t i = 0; i < run; ++i) {
            const __m512 p = _mm512_set1_ps(p0[i]);
            for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm512_fmadd_ps(p, widen_bf16(v0 + i * D + 16 * c), acc[c]);
          }
        });
        alignas(64) float tmp[D];
        for (int c = 0; c < 2 * DC; ++c) _mm512_store_ps(tmp + 16 * c, acc[c]);
        for (int64_t d = 0; d < D; ++d) ob[g * D + d] = from_f32<c10::BFloat16>(tmp[d]);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3), "pages must be row-contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "K and V must share a layout");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be bfloat16 or float32");
  auto qc = q.contiguous();
  auto pg = pages.to(at::kLong).contiguous();
  auto ln = lens.to(at::kLong).contiguous();
  auto out = at::empty_like(qc);
  Layout L{q.size(0), q.size(1), q.size(2), k_cache.size(0), q.size(1) / k_cache.size(0), k_cache.size(2),
           pg.size(1), k_cache.stride(0), k_cache.stride(1)};
  const int64_t* pgp = pg.data_ptr<int64_t>();
  const int64_t* lnp = ln.data_ptr<int64_t>();
  const bool bf16_cache = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_cache || k_cache.scalar_type() == at::kFloat, "KV cache must be bfloat16 or float32");
  if (bf16_cache && q.scalar_type() == at::kBFloat16 && L.D % 32 == 0 && L.D <= 128) {
    auto* qp = qc.data_ptr<c10::BFloat16>();
    auto* kp = k_cache.data_ptr<c10::BFloat16>();
    auto* vp = v_cache.data_ptr<c10::BFloat16>();
    auto* opp = out.data_ptr<c10::BFloat16>();
    switch (L.D / 32) {
      case 1: decode_bf16<1>(qp, kp, vp, pgp, lnp, opp, L, scale, window, soft_cap); break;
      case 2: decode_bf16<2>(qp, kp, vp, pgp, lnp, opp, L, scale, window, soft_cap); break;
      case 3: decode_bf16<3>(qp, kp, vp, pgp, lnp, opp, L, scale, window, soft_cap); break;
      default: decode_bf16<4>(qp, kp, vp, pgp, lnp, opp, L, scale, window, soft_cap); break;
    }
    return out;
  }
  auto dispatch = [&](auto* qp, auto* opp) {
    if (bf16_cache) {
      decode_generic(qp, k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), pgp, lnp, opp, L, scale,
                     window, soft_cap);
    } else {
      decode_generic(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), pgp, lnp, opp, L, scale, window,
                     soft_cap);
    }
  };
  if (q.scalar_type() == at::kBFloat16) {
    dispatch(qc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  } else {
    dispatch(qc.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}
