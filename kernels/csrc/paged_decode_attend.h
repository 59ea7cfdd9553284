// The per-(sequence, kv head) attention variants of the paged decode kernel (paged_decode.cpp):
// each attends one range of positions of one KV head for its G query heads and returns the
// partial softmax (max, sum, unnormalised accumulator) that paged_decode.cpp normalises or merges.
// Included by paged_decode.cpp only.
#pragma once
#include <torch/extension.h>
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

namespace xllm::decode {

using xllm::from_f32;
using xllm::to_f32;

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

// Query rows of one work item: nq consecutive tokens of one sequence (a prefill chunk's
// neighbours attend the same pages, so one pass over a K/V row serves all of them) times the G
// query heads of one KV head. Row r = j * G + g reads token b + j's head h * G + g and attends
// positions t0 .. t0 + valid[r] - 1 (the tokens' lengths differ: each stops at its own position).
struct QueryRows {
  int64_t b, nq, rows;
  const int64_t* valid;  // [rows]
};

// scores[r] <- exp(scores[r] - max) over its valid[r] positions, zero past them (so a V pass can
// run every row of a group to the group's longest); m[r] = max, l[r] = sum.
inline void exp_rows(float* scores, const QueryRows& qr, int64_t n, const Partial& out) {
  for (int64_t r = 0; r < qr.rows; ++r) {
    float* __restrict sr = scores + r * n;
    const int64_t nv = qr.valid[r];
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    if (nv > 0) {
#pragma omp simd reduction(max : mx)
      for (int64_t i = 0; i < nv; ++i) mx = std::max(mx, sr[i]);
      // A simd loop lets the compiler use the vector expf from glibc's libmvec.
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < nv; ++i) { sr[i] = std::exp(sr[i] - mx); sum += sr[i]; }
    }
    std::fill(sr + std::max<int64_t>(nv, 0), sr + n, 0.f);
    out.m[r] = mx;
    out.l[r] = sum;
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
void attend_generic(const Args<TQ, TC>& a, const QueryRows& qr, int64_t h, int64_t t0, int64_t t1, Scratch& s,
                    const Partial& out) {
  const int64_t b = qr.b;  // one token: the driver gives this variant no runs
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
  exp_rows(s.scores.data(), qr, n, out);
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

// int8 cache, head_dim = 16 * DC; the query heads of this KV head are taken GM at a time (GM divides G).
// Rows are widened to fp32 in registers and their scale applied after the dot product (K) or folded
// into the softmax weight (V), so a row is converted once per pass and never written back to memory.
template <int DC, int GM, typename TQ>
void attend_i8(const Args<TQ, int8_t>& a, const QueryRows& qr, int64_t h, int64_t t0, int64_t t1, Scratch& s,
               const Partial& out) {
  const int64_t b = qr.b;  // one token: the driver gives this variant no runs
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
  const float* qf = s.qf.data();
  for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
    const int8_t* k0 = kbase + page * L.page_stride + off * RS;
    float* o = s.scores.data() + (r0 - t0);
    int64_t i = 0;
    // Four rows at a time share one horizontal reduction per query head.
    for (; i + 4 <= run; i += 4) {
      const int8_t* k = k0 + i * RS;
      __m512 kv[4][DC];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < DC; ++c) kv[r][c] = widen_i8(k + r * RS + 16 * c);
      const __m128 ks = _mm_setr_ps(row_scale(k, D), row_scale(k + RS, D), row_scale(k + 2 * RS, D),
                                    row_scale(k + 3 * RS, D));
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        __m512 acc[4];
        for (int r = 0; r < 4; ++r) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[r][0]);
        for (int c = 1; c < DC; ++c) {
          const __m512 qc = _mm512_loadu_ps(qg + 16 * c);
          for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(qc, kv[r][c], acc[r]);
        }
        _mm_storeu_ps(o + g * n + i, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), ks));
      }
    }
    for (; i < run; ++i) {
      const int8_t* k = k0 + i * RS;
      const float ks = row_scale(k, D);
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qf + g * D), widen_i8(k));
        for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * c), widen_i8(k + 16 * c), acc);
        o[g * n + i] = _mm512_reduce_add_ps(acc) * ks;
      }
    }
  });
  if (a.soft_cap > 0)
    for (int64_t i = 0; i < G * n; ++i) s.scores[i] = cap_score(s.scores[i], a.soft_cap);
  exp_rows(s.scores.data(), qr, n, out);
  for (int64_t g0 = 0; g0 < G; g0 += GM) {
    __m512 acc[GM][DC];
    for (int g = 0; g < GM; ++g)
      for (int c = 0; c < DC; ++c) acc[g][c] = _mm512_setzero_ps();
    for_each_run(t0, t1, L.PS, pages, [&](int64_t r0, int64_t page, int64_t off, int64_t run) {
      const int8_t* v0 = vbase + page * L.page_stride + off * RS;
      const float* p0 = s.scores.data() + g0 * n + (r0 - t0);
      for (int64_t i = 0; i < run; ++i) {
        const int8_t* v = v0 + i * RS;
        const float vs = row_scale(v, D);
        __m512 vv[DC];
        for (int c = 0; c < DC; ++c) vv[c] = widen_i8(v + 16 * c);
        for (int g = 0; g < GM; ++g) {
          const __m512 p = _mm512_set1_ps(p0[g * n + i] * vs);
          for (int c = 0; c < DC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
        }
      }
    });
    for (int g = 0; g < GM; ++g)
      for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out.acc + (g0 + g) * D + 16 * c, acc[g][c]);
  }
}
#endif

#if defined(XLLM_DECODE_AVX512) && defined(__AVX512BF16__)
#define XLLM_DECODE_AVX512_BF16 1
inline __m512 widen_bf16(const c10::BFloat16* p) {
  // bf16 -> fp32 is a 16-bit left shift of each lane.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The V pass for GM query rows from r0: each V row is widened to fp32 once for all of them.
template <int DC, int GM>
void accumulate_v_bf16(const c10::BFloat16* vbase, const int64_t* pages, const Layout& L, const float* scores,
                       int64_t n, int64_t t0, int64_t t1, int64_t r0, float* out_acc) {
  constexpr int64_t D = 32 * DC;
  __m512 acc[GM][2 * DC];
  for (int g = 0; g < GM; ++g)
    for (int c = 0; c < 2 * DC; ++c) acc[g][c] = _mm512_setzero_ps();
  for_each_run(t0, t1, L.PS, pages, [&](int64_t p0, int64_t page, int64_t off, int64_t run) {
    const c10::BFloat16* v0 = vbase + page * L.page_stride + off * D;
    const float* sp = scores + r0 * n + (p0 - t0);
    for (int64_t i = 0; i < run; ++i) {
      __m512 vv[2 * DC];
      for (int c = 0; c < 2 * DC; ++c) vv[c] = widen_bf16(v0 + i * D + 16 * c);
      for (int g = 0; g < GM; ++g) {
        const __m512 p = _mm512_set1_ps(sp[g * n + i]);
        for (int c = 0; c < 2 * DC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
      }
    }
  });
  for (int g = 0; g < GM; ++g)
    for (int c = 0; c < 2 * DC; ++c) _mm512_storeu_ps(out_acc + (r0 + g) * D + 16 * c, acc[g][c]);
}

// bf16 cache, bf16 q, head_dim = 32 * DC (DC <= 4 chunks, i.e. head_dim <= 128), every row of `qr`.
template <int DC>
void attend_bf16(const Args<c10::BFloat16, c10::BFloat16>& a, const QueryRows& qr, int64_t h, int64_t t0,
                 int64_t t1, Scratch& s, const Partial& out) {
  constexpr int64_t D = 32 * DC;
  // Accumulators of a V-pass group in registers: 24 of the 32 zmm, the rest for the V row.
  constexpr int kGroup = 12 / DC > 6 ? 6 : 12 / DC;
  const Layout& L = a.L;
  const int64_t n = t1 - t0, G = L.G;
  s.scores.resize(qr.rows * n);
  const c10::BFloat16* kbase = a.k + h * L.head_stride;
  const c10::BFloat16* vbase = a.v + h * L.head_stride;
  const int64_t* pages = a.pages + qr.b * L.P;
  for (int64_t r = 0; r < qr.rows; ++r) {
    const int64_t j = r / G, g = r % G;
    const c10::BFloat16* qrow = a.q + ((qr.b + j) * L.H + h * G + g) * D;
    __m512bh qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qrow + 32 * c);
    float* sg = s.scores.data() + r * n;
    auto dot = [&](const c10::BFloat16* krow) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < DC; ++c) acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(krow + 32 * c));
      return acc;
    };
    for_each_run(t0, t0 + std::max<int64_t>(qr.valid[r], 0), L.PS, pages,
                 [&](int64_t p0, int64_t page, int64_t off, int64_t run) {
      const c10::BFloat16* k0 = kbase + page * L.page_stride + off * D;
      float* o = sg + (p0 - t0);
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
      for (int64_t i = 0; i < qr.valid[r]; ++i) sg[i] = cap_score(sg[i], a.soft_cap);
  }
  exp_rows(s.scores.data(), qr, n, out);
  for (int64_t r0 = 0; r0 < qr.rows;) {
    const int64_t gm = std::min<int64_t>(kGroup, qr.rows - r0);
    int64_t longest = 0;
    for (int64_t r = r0; r < r0 + gm; ++r) longest = std::max(longest, qr.valid[r]);
    const int64_t t_end = t0 + std::max<int64_t>(longest, 0);
    switch (gm) {
      case 1: accumulate_v_bf16<DC, 1>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
      case 2: accumulate_v_bf16<DC, 2>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
      case 3: accumulate_v_bf16<DC, 3>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
      case 4: accumulate_v_bf16<DC, 4>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
      case 5: accumulate_v_bf16<DC, 5>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
      default: accumulate_v_bf16<DC, 6>(vbase, pages, L, s.scores.data(), n, t0, t_end, r0, out.acc); break;
    }
    r0 += gm;
  }
}
#endif

}  // namespace xllm::decode
