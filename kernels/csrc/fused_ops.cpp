// Fused elementwise ops of a decoder layer, for the bf16 decode path where each of the ~40 small
// ATen ops per layer costs more in dispatch than in arithmetic. Each op rounds to the activation
// dtype at the same points as the PyTorch reference in kernels/{norm,rotary,activation}.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

namespace {

using xllm::from_f32;
using xllm::to_f32;

// Rows per task: small batches stay on the calling thread (no fork/join for one token).
constexpr int64_t kRowGrain = 8;

template <typename T>
void add_rms_norm_impl(T* res, const T* x, const T* w, T* out, int64_t rows, int64_t C, double eps, bool offset) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* r = res + i * C;
      float ss = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        // The residual sum is rounded first, as `h = h + x` does, and the norm reads that.
        float v = to_f32(r[c]);
        if (x) {
          v = to_f32(from_f32<T>(v + to_f32(x[i * C + c])));
          r[c] = from_f32<T>(v);
        }
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
      T* o = out + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const float n = to_f32(r[c]) * inv;
        // Llama rounds the normalised value, then scales in the dtype; Gemma scales by (1 + w) in fp32.
        o[c] = offset ? from_f32<T>(n * (1.f + to_f32(w[c]))) : from_f32<T>(to_f32(w[c]) * to_f32(from_f32<T>(n)));
      }
    }
  });
}

template <typename T>
void silu_mul_impl(const T* x, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = x + i * 2 * I;
      const T* u = g + I;
      T* o = out + i * I;
#pragma omp simd
      for (int64_t c = 0; c < I; ++c) {
        const float gv = to_f32(g[c]);
        const float s = to_f32(from_f32<T>(gv / (1.f + std::exp(-gv))));
        o[c] = from_f32<T>(s * to_f32(u[c]));
      }
    }
  });
}

// A K or V head row into the cache: copied as is, or quantized into an int8 row with its fp32
// scale appended (kernels/kv_quant.py: scale = max|x| / 127, round half to even).
template <typename T>
inline void store_row(T* dst, const T* src, int64_t D) {
  std::memcpy(dst, src, D * sizeof(T));
}
template <typename T>
inline void store_row(int8_t* dst, const T* src, int64_t D) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(to_f32(src[d])));
  const float scale = amax / 127.f;
  for (int64_t d = 0; d < D; ++d) {
    const float q = scale > 0.f ? std::nearbyint(to_f32(src[d]) / scale) : 0.f;
    dst[d] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, q)));
  }
  std::memcpy(dst + D, &scale, sizeof(scale));
}

template <typename T, typename TC>
void rotary_kv_impl(T* qkv, const T* cos, const T* sin, int64_t cs_stride, TC* cache, const int64_t* slots,
                    int64_t tokens, int64_t H, int64_t KVH, int64_t D, int64_t row, int64_t cache_slots) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* qrow = qkv + t * width;
      const T* c = cos + t * cs_stride;
      const T* s = sin + t * cs_stride;
      for (int64_t h = 0; h < H + KVH; ++h) {  // q heads then k heads, rotated in place
        T* x = qrow + h * D;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = to_f32(x[j]), x2 = to_f32(x[j + half]);
          const float cj = to_f32(c[j]), sj = to_f32(s[j]);
          x[j] = from_f32<T>(x1 * cj - x2 * sj);
          x[j + half] = from_f32<T>(x2 * cj + x1 * sj);
        }
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < KVH; ++h) {
        store_row(cache + (h * cache_slots + slot) * row, qrow + (H + h) * D, D);
        store_row(cache + ((KVH + h) * cache_slots + slot) * row, qrow + (H + KVH + h) * D, D);
      }
    }
  });
}

}  // namespace

at::Tensor add_rms_norm_(at::Tensor residual, c10::optional<at::Tensor> x, at::Tensor weight, double eps,
                         bool unit_offset) {
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous(), "add_rms_norm_: contiguous tensors only");
  TORCH_CHECK(weight.scalar_type() == residual.scalar_type(), "add_rms_norm_: weight dtype must match");
  const int64_t C = residual.size(-1), rows = residual.numel() / C;
  at::Tensor xc;
  if (x.has_value()) {
    xc = x->contiguous();
    TORCH_CHECK(xc.sizes() == residual.sizes() && xc.scalar_type() == residual.scalar_type(), "add_rms_norm_: x");
  }
  auto out = at::empty_like(residual);
  AT_DISPATCH_SWITCH(residual.scalar_type(), "add_rms_norm_",
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      add_rms_norm_impl<c10::BFloat16>(residual.data_ptr<c10::BFloat16>(), xc.defined() ? xc.data_ptr<c10::BFloat16>() : nullptr,
                                       weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, C, eps, unit_offset);
    })
    AT_DISPATCH_CASE(at::kFloat, [&] {
      add_rms_norm_impl<float>(residual.data_ptr<float>(), xc.defined() ? xc.data_ptr<float>() : nullptr,
                               weight.data_ptr<float>(), out.data_ptr<float>(), rows, C, eps, unit_offset);
    }));
  return out;
}

at::Tensor silu_and_mul(at::Tensor x) {
  auto xc = x.contiguous();
  const int64_t I = xc.size(-1) / 2, rows = xc.numel() / (2 * I);
  auto sizes = xc.sizes().vec();
  sizes.back() = I;
  auto out = at::empty(sizes, xc.options());
  AT_DISPATCH_SWITCH(xc.scalar_type(), "silu_and_mul",
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      silu_mul_impl<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, I);
    })
    AT_DISPATCH_CASE(at::kFloat, [&] { silu_mul_impl<float>(xc.data_ptr<float>(), out.data_ptr<float>(), rows, I); }));
  return out;
}

void rotary_write_kv_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads) {
  const int64_t T_ = qkv.size(0);
  if (T_ == 0) return;
  const int64_t D = qkv.numel() / (T_ * (num_heads + 2 * num_kv_heads));
  const bool int8_cache = kv_cache.scalar_type() == at::kChar;
  const int64_t row = int8_cache ? D + 4 : D;  // an int8 row carries its fp32 scale (kernels/kv_quant.py)
  TORCH_CHECK(qkv.is_contiguous() && qkv.numel() == T_ * (num_heads + 2 * num_kv_heads) * D, "rotary_write_kv_: qkv");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(1) == num_kv_heads &&
              kv_cache.size(4) == row, "rotary_write_kv_: cache");
  // cos/sin are usually the two halves of one [T, D] table row: any row stride, unit column stride.
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D / 2 && cos.stride(1) == 1 && cos.sizes() == sin.sizes() &&
              cos.strides() == sin.strides() && cos.size(0) == T_, "rotary_write_kv_: cos/sin must be [T, D/2]");
  TORCH_CHECK((int8_cache || qkv.scalar_type() == kv_cache.scalar_type()) && cos.scalar_type() == qkv.scalar_type() &&
              sin.scalar_type() == qkv.scalar_type(),
              "rotary_write_kv_: one dtype for qkv and cos/sin, and the cache in it or int8");
  auto slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t cache_slots = kv_cache.size(2) * kv_cache.size(3);
  AT_DISPATCH_SWITCH(qkv.scalar_type(), "rotary_write_kv_",
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = c10::BFloat16;
      auto* q = qkv.data_ptr<T>();
      if (int8_cache) {
        rotary_kv_impl<T, int8_t>(q, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), kv_cache.data_ptr<int8_t>(),
                                  slots.data_ptr<int64_t>(), T_, num_heads, num_kv_heads, D, row, cache_slots);
      } else {
        rotary_kv_impl<T, T>(q, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), kv_cache.data_ptr<T>(),
                             slots.data_ptr<int64_t>(), T_, num_heads, num_kv_heads, D, row, cache_slots);
      }
    })
    AT_DISPATCH_CASE(at::kFloat, [&] {
      using T = float;
      auto* q = qkv.data_ptr<T>();
      if (int8_cache) {
        rotary_kv_impl<T, int8_t>(q, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), kv_cache.data_ptr<int8_t>(),
                                  slots.data_ptr<int64_t>(), T_, num_heads, num_kv_heads, D, row, cache_slots);
      } else {
        rotary_kv_impl<T, T>(q, cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0), kv_cache.data_ptr<T>(),
                             slots.data_ptr<int64_t>(), T_, num_heads, num_kv_heads, D, row, cache_slots);
      }
    }));
}
