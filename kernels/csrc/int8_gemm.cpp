// The W8A8 GEMM on prepacked weights: y[M, N] = xq[M, K] @ w[N, K]^T in int32, exactly what
// torch._int_mm computes, optionally with the dequantization fused into the store
// (y = acc * x_scale[m] * w_scale[n] (+ bias[n]) in fp32 or bf16, as dequant_rows computes it).
//
// Why not oneDNN: at decode batches (tens of rows) _int_mm reorders its weight on every call and
// reaches about half the int8 peak with the weights streaming from DRAM (SmolLM2, 64 rows, every
// layer's GEMMs and the LM head: 18 ms against 12 ms here).
//
// Layout (kernels/int8_pack.py): tiles of 16 output columns; in a tile, for each group of 4 input
// channels, the 16 columns' 4 weights side by side (64 bytes: one VNNI operand). The weights are
// stored + 128 as unsigned bytes, because vpdpbusd multiplies unsigned by signed bytes: the
// activations stay signed (a broadcast of 4 of them is the other operand) and each dot product
// carries 128 * sum(x row), taken off before the store. Integer sums are exact, so the result
// does not depend on the blocking.
//
// Blocking: a thread owns a range of tiles; it walks them 4 at a time (a panel: 36 KB of weights
// at K = 576, in L1) and runs every 6-row block of the activations over the panel, 24 int32
// accumulators in registers. Each row block prefetches its share of the next panel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <vector>

#include "vec16.h"

#ifdef __AVX512VNNI__
namespace {

constexpr int64_t kTile = 16;   // output columns per tile (one int32 lane each)
constexpr int kPanelTiles = 4;  // tiles per register block
constexpr int kRowBlock = 6;    // activation rows per register block (6 x 4 accumulators + 4 weights)
constexpr int64_t kRowChunk = 192;  // rows per pass over a thread's tiles (their activations stay in L2)

// acc += u8 weights . s8 activations. Inline assembly, not the intrinsic: GCC 12 copies the
// accumulator around the intrinsic's tied operand (two extra moves per instruction, and spills
// with more than 16 accumulators), which halved the throughput.
inline void dot4(__m512i& acc, __m512i x_s8, __m512i w_u8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w_u8), "v"(x_s8));
}

// Where a block's results go: raw int32, or dequantized into T (fp32 or bf16).
struct Int32Out {
  int32_t* y;
  int64_t ldy;
  void store(int64_t m, int64_t n, __m512i acc, __mmask16 mask) const {
    _mm512_mask_storeu_epi32(y + m * ldy + n, mask, acc);
  }
};

template <typename T>
struct ScaledOut {
  T* y;
  int64_t ldy;
  const float* x_scale;  // [M]
  const float* w_scale;  // [N]
  const float* bias;     // [N] or null
  void store(int64_t m, int64_t n, __m512i acc, __mmask16 mask) const {
    const __m512 v = xllm::dequant16(acc, x_scale[m], w_scale + n, bias != nullptr ? bias + n : nullptr, mask);
    xllm::store16(y + m * ldy + n, v, mask);
  }
};

// Rows m0 .. m0 + MR of x against tiles t0 .. t0 + NT, over all K: named accumulators (an array
// of them is spilled by GCC), unused ones compiled out.
template <int MR, int NT, typename Out>
void block(const int8_t* x, int64_t K, const uint8_t* w, int64_t tile_bytes, const int32_t* corr, int64_t m0,
           int64_t n0, int64_t n_left, const Out& out, const uint8_t* prefetch, int64_t prefetch_lines) {
  static_assert(MR >= 1 && MR <= 6 && NT >= 1 && NT <= 4, "block: 1-6 rows by 1-4 tiles");
  const __m512i zero = _mm512_setzero_si512();
#define XLLM_ACC(m) __m512i c##m##0 = zero, c##m##1 = zero, c##m##2 = zero, c##m##3 = zero;
  XLLM_ACC(0) XLLM_ACC(1) XLLM_ACC(2) XLLM_ACC(3) XLLM_ACC(4) XLLM_ACC(5)
#undef XLLM_ACC
  const int8_t* xr = x + m0 * K;
  const int64_t groups = K / 4;
  const int64_t lines_per_group = (prefetch_lines + groups - 1) / groups;
  for (int64_t g = 0; g < groups; ++g) {
    // This block's share of the next panel, a line or a few per step: spread out, so the misses
    // never fill the core's miss buffers (a burst stalls it as loads would).
    for (int64_t line = g * lines_per_group; line < std::min(prefetch_lines, (g + 1) * lines_per_group); ++line)
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + line * 64), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(w + g * 64);
    const __m512i b1 = NT > 1 ? _mm512_loadu_si512(w + tile_bytes + g * 64) : zero;
    const __m512i b2 = NT > 2 ? _mm512_loadu_si512(w + 2 * tile_bytes + g * 64) : zero;
    const __m512i b3 = NT > 3 ? _mm512_loadu_si512(w + 3 * tile_bytes + g * 64) : zero;
#define XLLM_ROW(m)                                 \
  if constexpr (MR > m) {                           \
    const __m512i a = xllm::broadcast4(xr + m * K + 4 * g); \
    dot4(c##m##0, a, b0);                           \
    if constexpr (NT > 1) dot4(c##m##1, a, b1);     \
    if constexpr (NT > 2) dot4(c##m##2, a, b2);     \
    if constexpr (NT > 3) dot4(c##m##3, a, b3);     \
  }
    XLLM_ROW(0) XLLM_ROW(1) XLLM_ROW(2) XLLM_ROW(3) XLLM_ROW(4) XLLM_ROW(5)
#undef XLLM_ROW
  }
#define XLLM_STORE(m)                                                                           \
  if constexpr (MR > m) {                                                                       \
    const __m512i off = _mm512_set1_epi32(corr[m0 + m]);                                       \
    out.store(m0 + m, n0, _mm512_sub_epi32(c##m##0, off), xllm::tail_mask(n_left));             \
    if constexpr (NT > 1) out.store(m0 + m, n0 + 16, _mm512_sub_epi32(c##m##1, off), xllm::tail_mask(n_left - 16)); \
    if constexpr (NT > 2) out.store(m0 + m, n0 + 32, _mm512_sub_epi32(c##m##2, off), xllm::tail_mask(n_left - 32)); \
    if constexpr (NT > 3) out.store(m0 + m, n0 + 48, _mm512_sub_epi32(c##m##3, off), xllm::tail_mask(n_left - 48)); \
  }
  XLLM_STORE(0) XLLM_STORE(1) XLLM_STORE(2) XLLM_STORE(3) XLLM_STORE(4) XLLM_STORE(5)
#undef XLLM_STORE
}

template <typename Out>
using BlockFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, const int32_t*, int64_t, int64_t, int64_t,
                         const Out&, const uint8_t*, int64_t);

template <int MR, typename Out>
BlockFn<Out> pick_tiles(int nt) {
  switch (nt) {
    case 1: return block<MR, 1, Out>;
    case 2: return block<MR, 2, Out>;
    case 3: return block<MR, 3, Out>;
    default: return block<MR, 4, Out>;
  }
}

template <typename Out>
BlockFn<Out> pick(int mr, int nt) {
  switch (mr) {
    case 1: return pick_tiles<1, Out>(nt);
    case 2: return pick_tiles<2, Out>(nt);
    case 3: return pick_tiles<3, Out>(nt);
    case 4: return pick_tiles<4, Out>(nt);
    case 5: return pick_tiles<5, Out>(nt);
    default: return pick_tiles<6, Out>(nt);
  }
}

// 128 * sum of each row of x: what the +128 weight offset adds to every dot product of the row.
std::vector<int32_t> offset_terms(const int8_t* x, int64_t M, int64_t K) {
  std::vector<int32_t> corr(M);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(mask, x + m * K + k));
    }
    corr[m] = 128 * _mm512_reduce_add_epi32(sum);
  }
  return corr;
}

template <typename Out>
void run(const at::Tensor& xq, const at::Tensor& packed, int64_t N, const Out& out) {
  const int64_t M = xq.size(0), K = xq.size(1), tiles = packed.size(0), tile_bytes = packed.size(1) * 64;
  const int8_t* x = xq.data_ptr<int8_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const std::vector<int32_t> corr = offset_terms(x, M, K);
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
      const int64_t r1 = std::min(M, r0 + kRowChunk);
      for (int64_t t = t_begin; t < t_end; t += kPanelTiles) {
        const int nt = static_cast<int>(std::min<int64_t>(kPanelTiles, t_end - t));
        const uint8_t* panel = w + t * tile_bytes;
        // The next panel (the tiles are consecutive: one range), spread over this panel's row blocks.
        const uint8_t* next = panel + nt * tile_bytes;
        const int64_t next_lines = std::min<int64_t>(kPanelTiles, t_end - t - nt) * tile_bytes / 64;
        const int64_t blocks = (r1 - r0 + kRowBlock - 1) / kRowBlock;
        const int64_t share = (next_lines + blocks - 1) / blocks;
        for (int64_t m = r0, b = 0; m < r1; m += kRowBlock, ++b) {
          const int mr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - m));
          const int64_t first = std::min(next_lines, b * share), lines = std::min(next_lines, first + share) - first;
          pick<Out>(mr, nt)(x, K, panel, tile_bytes, corr.data(), m, t * kTile, N - t * kTile, out,
                            next + first * 64, lines);
        }
      }
    }
  });
}

void check(const at::Tensor& xq, const at::Tensor& packed, int64_t N, const char* name) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.is_contiguous(), name,
              ": xq must be contiguous int8 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == 64 && packed.is_contiguous(),
              name, ": packed must be contiguous uint8 [tiles, K / 4, 64] (kernels/int8_pack.py)");
  TORCH_CHECK(xq.size(1) == 4 * packed.size(1) && N > (packed.size(0) - 1) * kTile && N <= packed.size(0) * kTile,
              name, ": packed weights do not fit [", xq.size(0), ", ", xq.size(1), "] x N = ", N);
}

}  // namespace

bool int8_gemm_supported() { return true; }

at::Tensor int8_gemm(at::Tensor xq, at::Tensor packed, int64_t n) {
  xq = xq.contiguous();
  check(xq, packed, n, "int8_gemm");
  auto y = at::empty({xq.size(0), n}, xq.options().dtype(at::kInt));
  run(xq, packed, n, Int32Out{y.data_ptr<int32_t>(), n});
  return y;
}

at::Tensor int8_gemm_dequant(at::Tensor xq, at::Tensor x_scale, at::Tensor packed, at::Tensor w_scale,
                             c10::optional<at::Tensor> bias, at::ScalarType out_dtype) {
  xq = xq.contiguous();
  const int64_t n = w_scale.numel();
  check(xq, packed, n, "int8_gemm_dequant");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == xq.size(0),
              "int8_gemm_dequant: x_scale must be fp32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(), "int8_gemm_dequant: w_scale must be fp32 [N]");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "int8_gemm_dequant: bias must be fp32 [N]");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({xq.size(0), n}, xq.options().dtype(out_dtype));
  if (out_dtype == at::kBFloat16) {
    run(xq, packed, n, ScaledOut<c10::BFloat16>{y.data_ptr<c10::BFloat16>(), n, x_scale.data_ptr<float>(),
                                                 w_scale.data_ptr<float>(), b});
  } else {
    TORCH_CHECK(out_dtype == at::kFloat, "int8_gemm_dequant: out_dtype must be bf16 or fp32");
    run(xq, packed, n, ScaledOut<float>{y.data_ptr<float>(), n, x_scale.data_ptr<float>(), w_scale.data_ptr<float>(), b});
  }
  return y;
}

#else  // no AVX512-VNNI: PackedLinear keeps torch._int_mm

bool int8_gemm_supported() { return false; }

at::Tensor int8_gemm(at::Tensor, at::Tensor, int64_t) { TORCH_CHECK(false, "int8_gemm needs AVX512-VNNI"); }

at::Tensor int8_gemm_dequant(at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
                             at::ScalarType) {
  TORCH_CHECK(false, "int8_gemm_dequant needs AVX512-VNNI");
}

#endif
