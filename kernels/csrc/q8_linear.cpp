// 8-bit linear for small batches, from a GGUF's Q8_0 blocks (w = d * q, q int8, one fp16 d per 32).
//
// The LM head of a small model is its largest matrix (SmolLM2-135M: 49152 x 576) and the files
// store it as Q8_0, the model's exact values. Multiplying those blocks by activations quantized
// per 32 values (act_blocks.h) is llama.cpp's Q8_0 x Q8_0 dot: integer products within a block,
// one fp32 multiply-add per block. The alternative kept before this kernel, an int8 copy with one
// scale per row, rounds the weights a second time and converts every weight to fp32 to multiply.
//
// The weights are repacked once (kernels/q8_pack.py) so that one vector instruction covers 16
// output rows: for every tile of 16 rows and every 32-weight block, 544 contiguous bytes
//
//   d[16] fp16 | 8 x 64 bytes of weights, stored unsigned as q + 128
//
// where in chunk c the byte (4 i + j) is row i's weight 4c + j. A chunk is then exactly the
// unsigned operand of VNNI's dpbusd against 4 activation bytes broadcast to every lane: each int32
// lane accumulates one output row (nothing is reduced across lanes), and one contiguous stream per
// tile keeps the prefetcher busy. dpbusd needs one unsigned operand; the weights take that side
// (an offset of 128) because its correction, 128 * sum(q_x) of the block, is one scalar per
// activation block, subtracted in int32, exactly; an unsigned activation side would need a stored
// per-row weight sum, 64 more bytes per 544.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

#include "block_linear.h"
#include "common.h"

namespace {

using xllm::broadcast4;

// acc += for each int32 lane, the dot of 4 unsigned weight bytes with 4 signed activation bytes.
inline __m512i dot_u8s8(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, w, x);
#else
  // maddubs saturates its int16 pair sums, and 255 * 127 * 2 does not fit: split each weight
  // byte into its low 7 bits and its top bit (w = lo + 128 hi), both products then fit.
  const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi8(0x7F));
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 7), _mm512_set1_epi8(1));
  acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(lo, x), _mm512_set1_epi16(1)));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(hi, x), _mm512_set1_epi16(128)));
#endif
}

// One tile (16 output rows) against MB activation rows: acc[m] lane i = y[m0 + m][row i].
struct Q8Tile {
  static constexpr int64_t kBlockBytes = 544;   // one tile's 32-weight block: 16 fp16 scales, 512 weight bytes
  static constexpr int64_t kPrefetchBytes = 4 * kBlockBytes;

  template <int MB>
  static void run(const uint8_t* w, int64_t blocks, const xllm::QuantizedRows& a, int64_t m0, int64_t K, __m512* acc) {
    // One activation row alone would wait on dpbusd's latency in a single chain: give it two.
    constexpr int kChains = MB == 1 ? 2 : 1;
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const int8_t* xq = a.q.data() + m0 * K;
    const int32_t* qsum = a.qsum.data() + m0 * (K / 32);
    const float* scale = a.scale.data() + m0 * (K / 32);
    for (int64_t b = 0; b < blocks; ++b, w += kBlockBytes) {
      for (int64_t line = 0; line < kBlockBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + line, _MM_HINT_T0);
      // sum((q_w + 128) q_x) - 128 sum(q_x) = sum(q_w q_x): the correction starts the chain (int32, exact)
      __m512i dot[MB][kChains];
      for (int m = 0; m < MB; ++m) {
        dot[m][0] = _mm512_set1_epi32(-128 * qsum[m * (K / 32) + b]);
        if (kChains == 2) dot[m][kChains - 1] = _mm512_setzero_si512();
      }
      for (int c = 0; c < 8; ++c) {
        const __m512i wc = _mm512_loadu_si512(w + 32 + 64 * c);
        for (int m = 0; m < MB; ++m)
          dot[m][c % kChains] = dot_u8s8(dot[m][c % kChains], wc, broadcast4(xq + m * K + b * 32 + 4 * c));
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      for (int m = 0; m < MB; ++m) {
        const __m512i sum = kChains == 2 ? _mm512_add_epi32(dot[m][0], dot[m][kChains - 1]) : dot[m][0];
        const __m512 dd = _mm512_mul_ps(d, _mm512_set1_ps(scale[m * (K / 32) + b]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, acc[m]);
      }
    }
  }
};

}  // namespace

at::Tensor q8_linear(at::Tensor x, at::Tensor packed, int64_t out_features, c10::optional<at::Tensor> bias) {
  return xllm::tiled_block_linear<Q8Tile>("q8_linear", "kernels/q8_pack.py", x, packed, out_features, bias);
}
