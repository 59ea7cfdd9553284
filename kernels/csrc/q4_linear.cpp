// 4-bit linear for small batches, from a GGUF's Q4_0 / Q4_1 blocks (w = d * q + m, q in 0..15).
//
// A decode step at batch 1 is a pass over every weight, so its time is the weights' bytes over
// memory bandwidth, as long as the arithmetic keeps up. A GGUF's 4-bit blocks are 0.625 bytes per
// weight against 1 for an int8 copy, and they are the model's exact weights (an int8 copy rounds
// them once more).
//
// The weights are repacked once (kernels/q4_pack.py) so that one vector instruction covers 16
// output rows: for every tile of 16 rows and every 32-weight block, 320 contiguous bytes
//
//   d[16] fp16 | m[16] fp16 | 4 x 64 bytes of nibbles
//
// where in chunk c the byte (4 i + j) holds row i's weight 8c + j in its low nibble and 8c + 4 + j
// in its high one. A masked nibble unpack then gives 16 rows x 4 consecutive weights, exactly the
// operand of VNNI's dpbusd against 4 activation bytes broadcast to every lane: each int32 lane
// accumulates one output row, so nothing is reduced across lanes, and one contiguous stream per
// tile keeps the prefetcher busy.
//
// Activations are quantized like llama.cpp's Q8_1 (act_blocks.h): symmetric int8 per 32-value block,
// with the block's scale and the sum of its dequantized values (for the m term).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

#include "block_linear.h"
#include "common.h"

namespace {

using xllm::QuantizedRows;
using xllm::broadcast4;

inline __m512i dot_u8s8(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}

// One tile (16 output rows) against MB activation rows: acc[m] lane i = y[m0 + m][row i].
struct Q4Tile {
  static constexpr int64_t kBlockBytes = 320;   // one tile's 32-weight block: scales, mins, nibbles
  static constexpr int64_t kPrefetchBytes = 8 * kBlockBytes;

  template <int MB>
  static void run(const uint8_t* w, int64_t blocks, const QuantizedRows& a, int64_t m0, int64_t K, __m512* acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, w += kBlockBytes) {
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 128, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 192, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 256, _MM_HINT_T0);
      __m512i lo_acc[MB], hi_acc[MB];
      for (int m = 0; m < MB; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const __m512i packed = _mm512_loadu_si512(w + 64 + 64 * c);
        const __m512i lo = _mm512_and_si512(packed, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
        for (int m = 0; m < MB; ++m) {
          const int8_t* xq = a.q.data() + (m0 + m) * K + b * 32 + 8 * c;
          lo_acc[m] = dot_u8s8(lo_acc[m], lo, broadcast4(xq));
          hi_acc[m] = dot_u8s8(hi_acc[m], hi, broadcast4(xq + 4));
        }
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
      for (int m = 0; m < MB; ++m) {
        const int64_t blk = (m0 + m) * (K / 32) + b;
        const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[m], hi_acc[m]));
        acc[m] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(a.scale[blk])), acc[m]);
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.sum[blk]), acc[m]);
      }
    }
  }
};

}  // namespace

at::Tensor q4_linear(at::Tensor x, at::Tensor packed, int64_t out_features, c10::optional<at::Tensor> bias) {
  return xllm::tiled_block_linear<Q4Tile>("q4_linear", "kernels/q4_pack.py", x, packed, out_features, bias);
}
