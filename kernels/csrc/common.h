// Scalar conversions shared by the CPU kernels.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>

namespace xllm {

inline float to_f32(float x) { return x; }
// bf16 is the top half of an fp32: a shift the compiler vectorizes (c10's conversion does not).
inline float to_f32(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even, as torch's own fp32 -> bf16 cast (inputs here are finite).
template <typename T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(bits >> 16);
  return out;
}

}  // namespace xllm
