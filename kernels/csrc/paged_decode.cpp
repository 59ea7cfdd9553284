// Decode attention over paged KV, reading pages in place (no gather copy). The per-(sequence,
// kv head) variants are in paged_decode_attend.h; this file splits the work and merges.
//
// One query token per sequence. Work is split over (sequence, kv head) pairs across the intra-op
// threads; each pair reads its K rows once for all the query heads that share that KV head, then
// its V rows once. Scores and accumulation are fp32; q and the output may be bf16 or fp32, the
// cache bf16, fp32 or int8 (rows of head_dim int8 values and their fp32 scale, kernels/kv_quant.py:
// dequantized in registers, so a row costs head_dim + 4 bytes of reads instead of 2 * head_dim).
// A bf16 cache with bf16 q and head_dim a multiple of 32 takes an AVX-512 BF16 path (dot products
// with vdpbf16ps), an int8 cache with head_dim 32, 64, 96 or 128 an AVX-512 path; anything else
// (or a CPU without AVX-512) the portable loop.
//
// Flash-decoding split: when there are fewer (sequence, kv head) pairs than twice the threads
// (batch 1 of a model with 3 KV heads on 2 threads leaves one thread idle a third of the time),
// each context is cut into chunks attended by different threads, and the partial softmax results
// (running max, sum of exponentials, unnormalised accumulator) are merged afterwards.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_decode_attend.h"

namespace {

using namespace xllm::decode;

// Tokens of one prefill chunk attended together (their query rows share each K/V row's loads).
constexpr int64_t kMaxRunTokens = 4;
// A chunk shorter than this costs more in the merge and the fork than it gains in balance.
constexpr int64_t kMinSplitTokens = 128;

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
void write_out(TQ* ob, const Partial& p, int64_t row0, int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    const float inv = p.l[row0 + g] > 0 ? 1.f / p.l[row0 + g] : 0.f;
    const float* acc = p.acc + (row0 + g) * D;
    for (int64_t d = 0; d < D; ++d) ob[g * D + d] = from_f32<TQ>(acc[d] * inv);
  }
}

// Whether tokens x and y (y's context the longer, `len` positions) read the same pages.
inline bool same_pages(const int64_t* px, const int64_t* py, int64_t len, int64_t page_size) {
  return std::equal(px, px + (len + page_size - 1) / page_size, py);
}

// Consecutive tokens of one sequence (each one position after the last, on the same pages: a
// prefill chunk) in runs of up to max_run tokens, attended together; decode tokens are runs of one.
std::vector<QueryRows> group_tokens(const Layout& L, const int64_t* pages, const int64_t* ln, int64_t max_run) {
  std::vector<QueryRows> runs;
  runs.reserve(L.B);
  for (int64_t b = 0; b < L.B;) {
    int64_t nq = 1;
    while (nq < max_run && b + nq < L.B && ln[b + nq] == ln[b + nq - 1] + 1 &&
           same_pages(pages + b * L.P, pages + (b + nq) * L.P, ln[b + nq], L.PS))
      ++nq;
    runs.push_back(QueryRows{b, nq, nq * L.G, nullptr});
    b += nq;
  }
  return runs;
}

// Runs `attend(rows, h, t0, t1, scratch, partial)` over every (run of tokens, kv head), split or not.
template <typename TQ, typename Attend>
void run_decode(const Layout& L, const int64_t* pg, const int64_t* ln, int64_t window, int64_t max_splits,
                int64_t max_run, TQ* op, Attend&& attend) {
  const int64_t G = L.G, D = L.D;
  // Each query of a run has its own sliding window start: runs only without one.
  const std::vector<QueryRows> runs = group_tokens(L, pg, ln, window > 0 ? 1 : max_run);
  const int64_t R = static_cast<int64_t>(runs.size()), W = R * L.KVH, max_rows = (window > 0 ? 1 : max_run) * G;
  auto start_of = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, ln[b] - window) : 0; };
  auto end_of = [&](const QueryRows& r) { return ln[r.b + r.nq - 1]; };  // the run's longest context
  int64_t longest = 0;
  for (const QueryRows& r : runs) longest = std::max(longest, end_of(r) - start_of(r.b));
  const int64_t S = choose_splits(W, longest, max_splits);
  const int64_t slot = max_rows * (D + 2);  // m, l, acc of one work item's rows
  // The rows of a run attend t0 .. their own length: valid[j * G + g] = ln[b + j] - t0.
  auto with_valid = [&](const QueryRows& r, int64_t t0, int64_t t1, std::vector<int64_t>& valid) {
    valid.resize(r.rows);
    for (int64_t j = 0; j < r.nq; ++j)
      for (int64_t g = 0; g < G; ++g) valid[j * G + g] = std::min(ln[r.b + j], t1) - t0;
    QueryRows out = r;
    out.valid = valid.data();
    return out;
  };
  if (S == 1) {
    at::parallel_for(0, W, 1, [&](int64_t begin, int64_t end) {
      Scratch s;
      std::vector<int64_t> valid;
      std::vector<float> buf(slot);
      const Partial p{buf.data(), buf.data() + max_rows, buf.data() + 2 * max_rows};
      for (int64_t w = begin; w < end; ++w) {
        const QueryRows& r = runs[w / L.KVH];
        const int64_t h = w % L.KVH, t0 = start_of(r.b), t1 = end_of(r);
        attend(with_valid(r, t0, t1, valid), h, t0, t1, s, p);
        for (int64_t j = 0; j < r.nq; ++j) write_out(op + ((r.b + j) * L.H + h * G) * D, p, j * G, G, D);
      }
    });
    return;
  }
  std::vector<float> parts(W * S * slot);
  auto partial_at = [&](int64_t item) {
    float* base = parts.data() + item * slot;
    return Partial{base, base + max_rows, base + 2 * max_rows};
  };
  at::parallel_for(0, W * S, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    std::vector<int64_t> valid;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item / S, c = item % S, h = w % L.KVH;
      const QueryRows& r = runs[w / L.KVH];
      const int64_t start = start_of(r.b), last = end_of(r), n = last - start;
      // Chunks end on page boundaries where they can, so no page run is cut in two.
      const int64_t chunk = ((n + S - 1) / S + L.PS - 1) / L.PS * L.PS;
      const int64_t t0 = std::min(last, start + c * chunk), t1 = std::min(last, t0 + chunk);
      const Partial p = partial_at(item);
      if (t0 >= t1) {
        std::fill(p.m, p.m + r.rows, -std::numeric_limits<float>::infinity());
        std::fill(p.l, p.l + r.rows, 0.f);
        std::fill(p.acc, p.acc + r.rows * D, 0.f);
        continue;
      }
      attend(with_valid(r, t0, t1, valid), h, t0, t1, s, p);
    }
  });
  // The merge is rows * D * S multiply-adds per item, and there are fewer items than 2 x threads:
  // on the calling thread it costs less than a second fork/join.
  std::vector<float> buf(slot);
  const Partial merged{buf.data(), buf.data() + max_rows, buf.data() + 2 * max_rows};
  for (int64_t w = 0; w < W; ++w) {
    const QueryRows& r = runs[w / L.KVH];
    std::fill(merged.acc, merged.acc + r.rows * D, 0.f);
    for (int64_t row = 0; row < r.rows; ++row) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < S; ++c) mx = std::max(mx, partial_at(w * S + c).m[row]);
      float sum = 0.f;
      for (int64_t c = 0; c < S; ++c) {
        const Partial p = partial_at(w * S + c);
        if (p.l[row] == 0.f) continue;
        const float f = std::exp(p.m[row] - mx);
        sum += p.l[row] * f;
        for (int64_t d = 0; d < D; ++d) merged.acc[row * D + d] += f * p.acc[row * D + d];
      }
      merged.l[row] = sum;
    }
    const int64_t h = w % L.KVH;
    for (int64_t j = 0; j < r.nq; ++j) write_out(op + ((r.b + j) * L.H + h * G) * D, merged, j * G, G, D);
  }
}

template <typename TQ, typename TC>
void decode_typed(const TQ* qp, const TC* kp, const TC* vp, const int64_t* pgp, const int64_t* lnp, TQ* op,
                  const Layout& L, double scale, int64_t window, double soft_cap, int64_t max_splits) {
  const Args<TQ, TC> a{qp, kp, vp, pgp, L, static_cast<float>(scale), soft_cap};
  auto generic = [&](const QueryRows& r, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
    attend_generic(a, r, h, t0, t1, s, p);
  };
#ifdef XLLM_DECODE_AVX512
  if constexpr (std::is_same_v<TC, int8_t>) {
    // head_dim 32, 64, 96 or 128; query heads per KV head taken in groups of up to 4 (2 past head_dim
    // 64), so a group's V accumulators stay in registers.
    const int64_t dc = L.D / 16;
    if (L.D % 16 == 0 && (dc == 2 || dc == 4 || dc == 6 || dc == 8)) {
      int64_t gm = 1;
      for (int64_t c = dc > 4 ? 2 : 4; c > 1; --c)
        if (L.G % c == 0) { gm = c; break; }
      auto run = [&](auto dcc, auto gmc) {
        run_decode(L, pgp, lnp, window, max_splits, 1, op,
                   [&](const QueryRows& r, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
                     attend_i8<decltype(dcc)::value, decltype(gmc)::value>(a, r, h, t0, t1, s, p);
                   });
      };
      auto by_group = [&](auto dcc) {
        switch (gm) {
          case 4: run(dcc, std::integral_constant<int, 4>{}); return;
          case 3: run(dcc, std::integral_constant<int, 3>{}); return;
          case 2: run(dcc, std::integral_constant<int, 2>{}); return;
          default: run(dcc, std::integral_constant<int, 1>{}); return;
        }
      };
      switch (dc) {
        case 2: by_group(std::integral_constant<int, 2>{}); return;
        case 4: by_group(std::integral_constant<int, 4>{}); return;
        case 6: by_group(std::integral_constant<int, 6>{}); return;
        default: by_group(std::integral_constant<int, 8>{}); return;
      }
    }
  }
#endif
#ifdef XLLM_DECODE_AVX512_BF16
  if constexpr (std::is_same_v<TC, c10::BFloat16> && std::is_same_v<TQ, c10::BFloat16>) {
    if (L.D % 32 == 0 && L.D <= 128) {
      auto run = [&](auto dc) {
        run_decode(L, pgp, lnp, window, max_splits, kMaxRunTokens, op,
                   [&](const QueryRows& r, int64_t h, int64_t t0, int64_t t1, Scratch& s, const Partial& p) {
                     attend_bf16<decltype(dc)::value>(a, r, h, t0, t1, s, p);
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
  run_decode(L, pgp, lnp, window, max_splits, 1, op, generic);
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
