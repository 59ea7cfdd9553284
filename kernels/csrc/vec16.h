// Sixteen-lane fp32 loads and stores of fp32 or bf16 rows, with a mask for a row's tail.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstdint>

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

}  // namespace xllm
