// Activations quantized per 32 values, as llama.cpp's Q8 activations: the operand of the kernels
// that multiply a GGUF's own weight blocks (q4_linear.cpp, q8_linear.cpp).
//
// Each block of 32 values gets a symmetric int8 scale d = max|x| / 127 and q = round(x / d), so the
// products with a block of integer weights are exact int32 dot products; only the block scales are
// fp32. The PyTorch reference is kernels.q4_pack.quantize_activation_blocks: both kernels' tests
// compare against it, so this must round the same way (nearest, ties to even).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace xllm {

struct QuantizedRows {
  std::vector<int8_t> q;      // [M][K]
  std::vector<float> scale;   // [M][K / 32]
  std::vector<float> sum;     // [M][K / 32]: scale * sum(q) of each block (a Q4_1 offset's term)
  std::vector<int32_t> qsum;  // [M][K / 32]: sum(q) of each block (the unsigned-weight correction)
};

template <typename T>
QuantizedRows quantize_activations(const T* x, int64_t M, int64_t K) {
  const int64_t blocks = K / 32;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<float>(M * blocks),
                    std::vector<int32_t>(M * blocks)};
  for (int64_t mb = 0; mb < M * blocks; ++mb) {
    float v[32];
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) {
      v[j] = to_f32(x[mb * 32 + j]);
      amax = std::max(amax, std::fabs(v[j]));
    }
    const float d = amax / 127.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    int isum = 0;
    for (int j = 0; j < 32; ++j) {
      const int qi = static_cast<int>(std::nearbyint(v[j] * inv));
      isum += qi;
      out.q[mb * 32 + j] = static_cast<int8_t>(qi);
    }
    out.scale[mb] = d;
    out.sum[mb] = d * static_cast<float>(isum);
    out.qsum[mb] = isum;
  }
  return out;
}

}  // namespace xllm
