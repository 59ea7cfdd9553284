// Sixteen-lane helpers shared by the CPU kernels: fp32 loads and stores of fp32 or bf16 rows (with a
// mask for a row's tail), the broadcast of 4 activation bytes, and the W8A8 dequantization.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace xllm {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
// Round-to-nearest-even, as torch's fp32 -> bf16 cast (values here are finite).
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(p), m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

// Four activation bytes broadcast to every lane: the other operand of a dpbusd whose lanes are 16
// output rows' (or columns') 4 consecutive weights.
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// acc * x_scale * w_scale[0..16) (+ bias[0..16)), in that order, for 16 int32 GEMM sums of one
// row: dequant_rows and int8_gemm's fused store both call it, so they agree bit for bit. The empty
// asms pin the order (two products, then the sum): -ffast-math would otherwise reassociate the
// products or contract the sum into an FMA differently where each caller inlines it.
inline __m512 dequant16(__m512i acc, float x_scale, const float* w_scale, const float* bias, __mmask16 m) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(x_scale));
  asm("" : "+v"(v));
  v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w_scale));
  asm("" : "+v"(v));
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias));
  return v;
}

}  // namespace xllm
