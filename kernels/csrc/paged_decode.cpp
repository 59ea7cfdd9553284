// Decode attention over paged KV, reading pages in place (no gather copy).
//
// One query token per sequence. Work is split over (sequence, kv head) pairs across the intra-op
// threads; each pair reads its K rows once for all the query heads that share that KV head, then
// its V rows once. Scores and accumulation are fp32; q and the output may be bf16 or fp32, the
// cache bf16, fp32 or int8 (rows of head_dim int8 values and their fp32 scale, kernels/kv_quant.py:
// dequantized in registers, so a row costs head_dim + 4 bytes of reads instead of 2 * head_dim).
// A bf16 cache with bf16 q and head_dim a multiple of 32 takes an AVX-512 BF16 path (dot products
// with vdpbf16ps), an int8 cache with head_dim a multiple of 16 an AVX-512 path; anything else
// (or a CPU without AVX-512) the portable loop.
//
// Flash-decoding split: when there are fewer (sequence, kv head) pairs than twice the threads
// (batch 1 of a model with 3 KV heads on 2 threads leaves one thread idle a third of the time),
// each context is cut into chunks attended by different threads, and the partial softmax results
// (running max, sum of exponentials, unnormalised accumulator) are merged afterwards.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define XLLM_DECODE_AVX512 1
#endif

namespace {

using xllm::from_f32;
using xllm::to_f32;

// A chunk shorter than this costs more in the merge and the fork than it gains in balance.
constexpr int64_t kMinSplitTokens = 128;

struct Layout {
  int64_t B, H, D, KVH, G, PS, P, head_stride, page_stride, row_stride;
};

// Thread-local buffers of one work item.
struct Scratch {
  std::vector<float> scores, qf, row;
};

// Partial attention of the G query heads of one (sequence, kv head) over a range of positions:
// m = max score, l = sum of exp(score - m), acc = sum of exp(score - m) * v (not normalised).
struct Partial {
  float* m;
  float* l;
  float* acc;
};

inline float cap_score(float s, double soft_cap) {
  return soft_cap > 0 ? static_cast<float>(std::tanh(s / soft_cap) * soft_cap) : s;
}

inline float row_scale(const int8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, sizeof(s));
  return s;
}

// scores[g] <- exp(scores[g] - max); m[g] = max, l[g] = sum.
inline void exp_rows(float* scores, int64_t G, int64_t n, const Partial& out) {
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict sg = scores + g * n;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sg[i]);
    float sum = 0.f;
    // A simd loop lets the compiler use the vector expf from glibc's libmvec.
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - mx); sum += sg[i]; }
    out.m[g] = mx;
    out.l[g] = sum;
  }
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

inline void load_row(const float* p, float* __restrict r, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) r[d] = p[d];
}
inline void load_row(const c10::BFloat16* p, float* __restrict r, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) r[d] = to_f32(p[d]);
}
inline void load_row(const int8_t* p, float* __restrict r, int64_t D) {
  const float s = row_scale(p, D);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) r[d] = static_cast<float>(p[d]) * s;
}

// Everything one kernel variant needs to attend a range of one (sequence, kv head).
template <typename TQ, typename TC>
struct Args {
  const TQ* q;
  const TC* k;
  const TC* v;
  const int64_t* pages;
  const Layout& L;
  float scale;
  double soft_cap;
};

// Portable path: any dtype, any head_dim.
template <typename TQ, typename TC>
void attend_generic(const Args<TQ, TC>& a, int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& s,
                    const Partial& out) {
  const Layout& L = a.L;
  const int64_t n = t1 - t0, D = L.D;
  s.scores.resize(L.G * n);
  s.qf.resize(L.G * D);
  s.row.resize(D);
  for (int64_t i = 0; i < L.G * D; ++i) s.qf[i] = to_f32(a.q[(b * L.H + h * L.G) * D + i]);
  const TC* kbase = a.k + h * L.head_stride;
  const TC* vbase = a.v + h * L.head_stride;
  const int64_t* pages = a.pages + b * L.P;
  for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
    for (int64_t i = 0; i < run; ++i) {
      load_row(kbase + page * L.page_stride + (off + i) * L.row_stride, s.row.data(), D);
      const float* __restrict r = s.row.data();
      for (int64_t g = 0; g < L.G; ++g) {
        const float* __restrict qg = s.qf.data() + g * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * r[d];
        s.scores[g * n + (r0 - t0) + i] = cap_score(dot * a.scale, a.soft_cap);
      }
    }
  });
  exp_rows(s.scores.data(), L.G, n, out);
  std::fill(out.acc, out.acc + L.G * D, 0.f);
  for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
    for (int64_t i = 0; i < run; ++i) {
      load_row(vbase + page * L.page_stride + (off + i) * L.row_stride, s.row.data(), D);
      const float* __restrict r = s.row.data();
      for (int64_t g = 0; g < L.G; ++g) {
        const float p = s.scores[g * n + (r0 - t0) + i];
        float* __restrict og = out.acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] += p * r[d];
      }
    }
  });
}

#ifdef XLLM_DECODE_AVX512
// Horizontal sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a,b,a,b per 128-bit lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a,b,c,d per lane
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

inline __m512 widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Rows dequantized per block into an L1 buffer, then shared by the G query heads of the KV head:
// widening int8 is the costly part (two conversions per 16 values), done once per row, not G times.
constexpr int64_t kI8Block = 16;

// rows x D int8 rows (stride rs) -> fp32 in buf, each times its inline scale.
template <int DC>
inline void dequant_block(const int8_t* r0, int64_t rows, int64_t rs, float* __restrict buf) {
  constexpr int64_t D = 16 * DC;
  for (int64_t i = 0; i < rows; ++i) {
    const int8_t* r = r0 + i * rs;
    const __m512 sv = _mm512_set1_ps(row_scale(r, D));
    for (int c = 0; c < DC; ++c) _mm512_store_ps(buf + i * D + 16 * c, _mm512_mul_ps(widen_i8(r + 16 * c), sv));
  }
}

// int8 cache, head_dim = 16 * DC.
template <int DC, typename TQ>
void attend_i8(const Args<TQ, int8_t>& a, int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& s,
               const Partial& out) {
  constexpr int64_t D = 16 * DC;
  const Layout& L = a.L;
  const int64_t n = t1 - t0, RS = L.row_stride, G = L.G;
  s.scores.resize(G * n);
  s.qf.resize(G * D);
  const int8_t* kbase = a.k + h * L.head_stride;
  const int8_t* vbase = a.v + h * L.head_stride;
  const int64_t* pages = a.pages + b * L.P;
  const TQ* qb = a.q + (b * L.H + h * G) * D;
  for (int64_t i = 0; i < G * D; ++i) s.qf[i] = to_f32(qb[i]) * a.scale;  // the softmax scale folded into q
  alignas(64) float buf[kI8Block * D];
  // Walks [t0, t1) in blocks of at most kI8Block rows inside one page run: f(first position, rows).
  auto for_each_block = [&](const int8_t* base, auto&& f) {
    for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
      for (int64_t i = 0; i < run; i += kI8Block) {
        const int64_t rows = std::min(kI8Block, run - i);
        dequant_block<DC>(base + page * L.page_stride + (off + i) * RS, rows, RS, buf);
        f(r0 + i - t0, rows);
      }
    });
  };
  for_each_block(kbase, [&](int64_t first, int64_t rows) {
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[DC];
      for (int c = 0; c < DC; ++c) qv[c] = _mm512_loadu_ps(s.qf.data() + g * D + 16 * c);
      auto dot = [&](const float* k) {
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_load_ps(k));
        for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_load_ps(k + 16 * c), acc);
        return acc;
      };
      float* o = s.scores.data() + g * n + first;
      int64_t i = 0;
      for (; i + 4 <= rows; i += 4) {
        const float* k = buf + i * D;
        _mm_storeu_ps(o + i, hsum4(dot(k), dot(k + D), dot(k + 2 * D), dot(k + 3 * D)));
      }
      for (; i < rows; ++i) o[i] = _mm512_reduce_add_ps(dot(buf + i * D));
    }
  });
  if (a.soft_cap > 0)
    for (int64_t i = 0; i < G * n; ++i) s.scores[i] = cap_score(s.scores[i], a.soft_cap);
  exp_rows(s.scores.data(), G, n, out);
  std::fill(out.acc, out.acc + G * D, 0.f);
  for_each_block(vbase, [&](int64_t first, int64_t rows) {
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[DC];
      for (int c = 0; c < DC; ++c) acc[c] = _mm512_loadu_ps(out.acc + g * D + 16 * c);
      const float* p0 = s.scores.data() + g * n + first;
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 p = _mm512_set1_ps(p0[i]);
        for (int c = 0; c < DC; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_load_ps(buf + i * D + 16 * c), acc[c]);
      }
      for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out.acc + g * D + 16 * c, acc[c]);
    }
  });
}
#endif

#if defined(XLLM_DECODE_AVX512) && defined(__AVX512BF16__)
#define XLLM_DECODE_AVX512_BF16 1
inline __m512 widen_bf16(const c10::BFloat16* p) {
  // bf16 -> fp32 is a 16-bit left shift of each lane.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// bf16 cache, bf16 q, head_dim = 32 * DC (DC <= 4 chunks, i.e. head_dim <= 128).
template <int DC>
void attend_bf16(const Args<c10::BFloat16, c10::BFloat16>& a, int64_t b, int64_t h, int64_t t0, int64_t t1,
                 Scratch& s, const Partial& out) {
  constexpr int64_t D = 32 * DC;
  const Layout& L = a.L;
  const int64_t n = t1 - t0;
  s.scores.resize(L.G * n);
  const c10::BFloat16* qb = a.q + (b * L.H + h * L.G) * D;
  const c10::BFloat16* kbase = a.k + h * L.head_stride;
  const c10::BFloat16* vbase = a.v + h * L.head_stride;
  const int64_t* pages = a.pages + b * L.P;
  for (int64_t g = 0; g < L.G; ++g) {
    __m512bh qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qb + g * D + 32 * c);
    float* sg = s.scores.data() + g * n;
    auto dot = [&](const c10::BFloat16* krow) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < DC; ++c) acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(krow + 32 * c));
      return acc;
    };
    for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
      const c10::BFloat16* k0 = kbase + page * L.page_stride + off * D;
      float* o = sg + (r0 - t0);
      int64_t i = 0;
      // Four positions at a time share one horizontal reduction (a third of the shuffles).
      for (; i + 4 <= run; i += 4) {
        const c10::BFloat16* k = k0 + i * D;
        const __m128 s4 = hsum4(dot(k), dot(k + D), dot(k + 2 * D), dot(k + 3 * D));
        _mm_storeu_ps(o + i, _mm_mul_ps(s4, _mm_set1_ps(a.scale)));
      }
      for (; i < run; ++i) o[i] = _mm512_reduce_add_ps(dot(k0 + i * D)) * a.scale;
    });
    if (a.soft_cap > 0)
      for (int64_t i = 0; i < n; ++i) sg[i] = cap_score(sg[i], a.soft_cap);
  }
  exp_rows(s.scores.data(), L.G, n, out);
  // One query head at a time keeps its accumulator in registers; the V rows of this
  // (sequence, kv head) stay in L1/L2 between the G passes.
  for (int64_t g = 0; g < L.G; ++g) {
    __m512 acc[2 * DC];
    for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm512_setzero_ps();
    const float* sg = s.scores.data() + g * n;
    for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
      const c10::BFloat16* v0 = vbase + page * L.page_stride + off * D;
      const float* p0 = sg + (r0 - t0);
      for (int64_t i = 0; i < run; ++i) {
        const __m512 p = _mm512_set1_ps(p0[i]);
        for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm512_fmadd_ps(p, widen_bf16(v0 + i * D + 16 * c), acc[c]);
      }
    });
    for (int c = 0; c < 2 * DC; ++c) _mm512_storeu_ps(out.acc + g * D + 16 * c, acc[c]);
  }
}
#endif

// How many chunks each context is cut into (1: no split). Enough chunks that every thread gets
// at least two work items and the item count divides evenly among the threads.
int64_t choose_splits(int64_t work, int64_t longest, int64_t max_splits) {
  const int64_t threads = at::get_num_threads();
  if (max_splits == 1 || threads <= 1 || work >= 2 * threads) return 1;
  int64_t splits = (2 * threads + work - 1) / work;
  for (int64_t s = splits; s < splits + threads; ++s) {
    if ((work * s) % threads == 0) { splits = s; break; }
  }
  splits = std::min(splits, (longest + kMinSplitTokens - 1) / kMinSplitTokens);
  if (max_splits > 0) splits = std::min(splits, max_splits);
  return std::max<int64_t>(splits, 1);
}

template <typename TQ>
void write_out(TQ* ob, const Partial& p, int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    const float inv = p.l[g] > 0 ? 1.f / p.l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[g * D + d] = from_f32<TQ>(p.acc[g * D + d] * inv);
  }
}

// Runs `attend(b, h, t0, t1, scratch, partial)` over every (sequence, kv head), split or not.
template <typename TQ, typename Attend>
void run_decode(const Layout& L, const int64_t* ln, int64_t window, int64_t max_splits, TQ* op, Attend&& attend) {
  const int64_t W = L.B * L.KVH, G = L.G, D = L.D;
  auto start_of = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, ln[b] - window) : 0; };
  int64_t longest = 0;
  for (int64_t b = 0; b < L.B; ++b) longest = std::max(longest, ln[b] - start_of(b));
  const int64_t S = choose_splits(W, longest, max_splits);
  if (S == 1) {
    at::parallel_for(0, W, 1, [&](int64_t begin, int64_t end) {
      Scratch s;
      std::vector<float> m(G), l(G), acc(G * D);
      const Partial p{m.data(), l.data(), acc.data()};
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / L.KVH, h = w % L.KVH;
        attend(b, h, start_of(b), ln[b], s, p);
        write_out(op + (b * L.H + h * G) * D, p, G, D);
      }
    });
    return;
  }
  const int64_t slot = G * (D + 2);  // m[G], l[G], acc[G * D] of one chunk
  std::vector<float> parts(W * S * slot);
  auto partial_at = [&](int64_t item) {
    float* base = parts.data() + item * slot;
    return Partial{base, base + G, base + 2 * G};
  };
  at::parallel_for(0, W * S, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item / S, c = item % S, b = w / L.KVH, h = w % L.KVH;
      const int64_t start = start_of(b), n = ln[b] - start;
      // Chunks end on page boundaries where they can, so no page run is cut in two.
      const int64_t chunk = ((n + S - 1) / S + L.PS - 1) / L.PS * L.PS;
      const int64_t t0 = std::min(ln[b], start + c * chunk), t1 = std::min(ln[b], t0 + chunk);
      const Partial p = partial_at(item);
      if (t0 >= t1) {
        std::fill(p.m, p.m + G, -std::numeric_limits<float>::infinity());
        std::fill(p.l, p.l + G, 0.f);
        std::fill(p.acc, p.acc + G * D, 0.f);
        continue;
      }
      attend(b, h, t0, t1, s, p);
    }
  });
  // The merge is G * D * S multiply-adds per pair, and there are fewer pairs than 2 x threads:
  // on the calling thread it costs less than a second fork/join.
  std::vector<float> m(G), l(G), acc(G * D);
  const Partial merged{m.data(), l.data(), acc.data()};
  for (int64_t w = 0; w < W; ++w) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < G; ++g) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < S; ++c) mx = std::max(mx, partial_at(w * S + c).m[g]);
      float sum = 0.f;
      for (int64_t c = 0; c < S; ++c) {
        const Partial p = partial_at(w * S + c);
        if (p.l[g] == 0.f) continue;
        const float f = std::exp(p.m[g] - mx);
        sum += p.l[g] * f;
        for (int64_t d = 0; d < D; ++d) acc[g * D + d] += f * p.acc[g * D + d];
      }
      l[g] = sum;
    }
    const int64_t b = w / L.KVH, h = w % L.KVH;
    write_out(op + (b * L.H + h * G) * D, merged, G, D);
  }
}

template <typename TQ, typename TC>
void decode_typed(const TQ* qp, const TC* kp, const TC* vp, const int64_t* pgp, const int64_t* lnp, TQ* op,
                  const Layout& L, double scale, int64_t window, double soft_cap, int64_t max_splits) {
  const Args<TQ, TC> a{qp, kp, vp, pgp, L, static_cast<float>(scale), soft_cap};
  auto generic = [&](int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
    attend_generic(a, b, h, t0, t1, s, p);
  };
#ifdef XLLM_DECODE_AVX512
  if constexpr (std::is_same_v<TC, int8_t>) {
    if (L.D % 16 == 0 && L.D <= 128) {
      auto run = [&](auto dc) {
        run_decode(L, lnp, window, max_splits, op,
                   [&](int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
                     attend_i8<decltype(dc)::value>(a, b, h, t0, t1, s, p);
                   });
      };
      switch (L.D / 16) {
        case 1: run(std::integral_constant<int, 1>{}); return;
        case 2: run(std::integral_constant<int, 2>{}); return;
        case 3: run(std::integral_constant<int, 3>{}); return;
        case 4: run(std::integral_constant<int, 4>{}); return;
        case 5: run(std::integral_constant<int, 5>{}); return;
        case 6: run(std::integral_constant<int, 6>{}); return;
        case 7: run(std::integral_constant<int, 7>{}); return;
        default: run(std::integral_constant<int, 8>{}); return;
      }
    }
  }
#endif
#ifdef XLLM_DECODE_AVX512_BF16
  if constexpr (std::is_same_v<TC, c10::BFloat16> && std::is_same_v<TQ, c10::BFloat16>) {
    if (L.D % 32 == 0 && L.D <= 128) {
      auto run = [&](auto dc) {
        run_decode(L, lnp, window, max_splits, op,
                   [&](int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
                     attend_bf16<decltype(dc)::value>(a, b, h, t0, t1, s, p);
                   });
      };
      switch (L.D / 32) {
        case 1: run(std::integral_constant<int, 1>{}); return;
        case 2: run(std::integral_constant<int, 2>{}); return;
        case 3: run(std::integral_constant<int, 3>{}); return;
        default: run(std::integral_constant<int, 4>{}); return;
      }
    }
  }
#endif
  run_decode(L, lnp, window, max_splits, op, generic);
}

template <typename TQ>
void decode_cache_dispatch(const at::Tensor& qc, const at::Tensor& k, const at::Tensor& v, const int64_t* pgp,
                           const int64_t* lnp, at::Tensor& out, const Layout& L, double scale, int64_t window,
                           double soft_cap, int64_t max_splits) {
  const TQ* qp = qc.data_ptr<TQ>();
  TQ* op = out.data_ptr<TQ>();
  switch (k.scalar_type()) {
    case at::kBFloat16:
      decode_typed(qp, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), pgp, lnp, op, L, scale, window,
                   soft_cap, max_splits);
      break;
    case at::kChar:
      decode_typed(qp, k.data_ptr<int8_t>(), v.data_ptr<int8_t>(), pgp, lnp, op, L, scale, window, soft_cap,
                   max_splits);
      break;
    default:
      decode_typed(qp, k.data_ptr<float>(), v.data_ptr<float>(), pgp, lnp, op, L, scale, window, soft_cap,
                   max_splits);
  }
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap,
                                  int64_t max_splits) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "K and V must share a layout");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be bfloat16 or float32");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(cache_type == at::kBFloat16 || cache_type == at::kFloat || cache_type == at::kChar,
              "KV cache must be bfloat16, float32 or int8");
  // An int8 row is head_dim values and a 4-byte fp32 scale (kernels/kv_quant.py).
  const int64_t row = cache_type == at::kChar ? q.size(2) + 4 : q.size(2);
  TORCH_CHECK(k_cache.size(3) == row, "KV rows hold ", k_cache.size(3), " elements, expected ", row);
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == row, "pages must be row-contiguous");
  auto qc = q.contiguous();
  auto pg = pages.to(at::kLong).contiguous();
  auto ln = lens.to(at::kLong).contiguous();
  auto out = at::empty_like(qc);
  const Layout L{q.size(0), q.size(1), q.size(2), k_cache.size(0), q.size(1) / k_cache.size(0), k_cache.size(2),
                 pg.size(1), k_cache.stride(0), k_cache.stride(1), row};
  const int64_t* pgp = pg.data_ptr<int64_t>();
  const int64_t* lnp = ln.data_ptr<int64_t>();
  if (q.scalar_type() == at::kBFloat16) {
    decode_cache_dispatch<c10::BFloat16>(qc, k_cache, v_cache, pgp, lnp, out, L, scale, window, soft_cap, max_splits);
  } else {
    decode_cache_dispatch<float>(qc, k_cache, v_cache, pgp, lnp, out, L, scale, window, soft_cap, max_splits);
  }
  return out;
}
