// The two elementwise halves of a W8A8 linear around torch._int_mm (oneDNN's VNNI int8 GEMM):
//
//   quantize_rows_s8: x[M,K] (bf16/fp32) -> q int8 [M,K], s fp32 [M], x * c ~= q * s[:, None]
//                     where c[K] is an optional per-channel factor (SmoothQuant's 1/smoothing)
//   dequant_rows:     acc int32 [M,N] -> y[M,N] = acc * xs[m] * ws[n] (+ bias[n]), in x's dtype
//   silu_mul_quantize_rows: the gated MLP's middle in one pass, from the gate/up GEMM's int32
//                     result straight to the down GEMM's int8 input: dequantize, silu(gate) * up,
//                     times the down projection's channel factor, per-row int8 (no bf16 round trips)
//
// Per-row (per-token) activation scales keep one outlier token from crushing the resolution
// of every other row in the batch, which a per-tensor scale would. Both passes are one sweep
// over memory, split over rows across the intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

#include "common.h"
#include "vec16.h"

namespace {

using xllm::load16;
using xllm::store16;
using xllm::tail_mask;

// q = round(h / s), s = max|h| / 127 over one row of K floats; returns s.
inline float quantize_row(const float* h, int64_t K, int8_t* q) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), h + k)));
  const float a = _mm512_reduce_max_ps(amax);
  const float scale = a > 0.f ? a / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / scale);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail_mask(K - k);
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, h + k), inv));
    _mm_mask_storeu_epi8(q + k, mk, _mm512_cvtsepi32_epi8(v));
  }
  return scale;
}

template <typename T>
void quantize_impl(const at::Tensor& x, const float* c, at::Tensor& q, at::Tensor& s) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);  // the row in fp32 (times c): a few KB, stays in L1
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = xp + m * K;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = tail_mask(K - k);
        __m512 v = load16(xr + k, mk);
        if (c != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, c + k));
        _mm512_mask_storeu_ps(row.data() + k, mk, v);
      }
      sp[m] = quantize_row(row.data(), K, qp + m * K);
    }
  });
}

template <typename T>
void dequant_impl(const at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws, const float* bias,
                  at::Tensor& y) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* xsp = xs.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  const int64_t lda = acc.stride(0);
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* arow = ap + m * lda;
      T* yrow = yp + m * N;
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mk = tail_mask(N - n);
        const __m512i a = _mm512_maskz_loadu_epi32(mk, arow + n);
        const __m512 v = xllm::dequant16(a, xsp[m], wsp + n, bias != nullptr ? bias + n : nullptr, mk);
        store16(yrow + n, v, mk);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> silu_mul_quantize_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale,
                                               c10::optional<at::Tensor> bias, c10::optional<at::Tensor> channel_scale) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.stride(1) == 1 && acc.size(1) % 2 == 0,
              "silu_mul_quantize_rows: acc must be int32 [M, 2I] with unit column stride");
  const int64_t M = acc.size(0), I = acc.size(1) / 2;
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == M,
              "silu_mul_quantize_rows: x_scale must be fp32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == 2 * I,
              "silu_mul_quantize_rows: w_scale must be fp32 [2I]");
  // Absent bias / channel factor: zeros / ones, so the hot loop has no branches.
  auto b = bias.has_value() ? *bias : at::zeros({2 * I}, acc.options().dtype(at::kFloat));
  auto c = channel_scale.has_value() ? *channel_scale : at::ones({I}, acc.options().dtype(at::kFloat));
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == 2 * I,
              "silu_mul_quantize_rows: bias must be fp32 [2I]");
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == I,
              "silu_mul_quantize_rows: channel_scale must be fp32 [I]");
  auto q = at::empty({M, I}, acc.options().dtype(at::kChar));
  auto s = at::empty({M}, acc.options().dtype(at::kFloat));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *xsp = x_scale.data_ptr<float>(), *wsp = w_scale.data_ptr<float>();
  const float *bp = b.data_ptr<float>(), *cp = c.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const int64_t lda = acc.stride(0);
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> h(I);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* gate = ap + m * lda;
      const int32_t* up = gate + I;
      const float xs = xsp[m];
      float* __restrict hp = h.data();
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float g = static_cast<float>(gate[j]) * xs * wsp[j] + bp[j];
        const float u = static_cast<float>(up[j]) * xs * wsp[I + j] + bp[I + j];
        hp[j] = g / (1.f + std::exp(-g)) * u * cp[j];
      }
      sp[m] = quantize_row(hp, I, qp + m * I);
    }
  });
  return {q, s};
}

std::vector<at::Tensor> quantize_rows_s8(at::Tensor x, c10::optional<at::Tensor> channel_scale) {
  TORCH_CHECK(x.dim() == 2, "quantize_rows_s8: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "quantize_rows_s8: x must be bf16 or fp32");
  const float* c = nullptr;
  if (channel_scale.has_value()) {
    TORCH_CHECK(channel_scale->scalar_type() == at::kFloat && channel_scale->is_contiguous() &&
                    channel_scale->numel() == x.size(1),
                "quantize_rows_s8: channel_scale must be fp32 [K]");
    c = channel_scale->data_ptr<float>();
  }
  x = x.contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto s = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {
    quantize_impl<c10::BFloat16>(x, c, q, s);
  } else {
    quantize_impl<float>(x, c, q, s);
  }
  return {q, s};
}

at::Tensor dequant_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale, c10::optional<at::Tensor> bias,
                        at::ScalarType out_dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.stride(1) == 1,
              "dequant_rows: acc must be int32 [M, N] with unit column stride");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == acc.size(0),
              "dequant_rows: x_scale must be fp32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == acc.size(1),
              "dequant_rows: w_scale must be fp32 [N]");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == acc.size(1),
                "dequant_rows: bias must be fp32 [N]");
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty(acc.sizes(), acc.options().dtype(out_dtype));
  if (out_dtype == at::kBFloat16) {
    dequant_impl<c10::BFloat16>(acc, x_scale, w_scale, bp, y);
  } else {
    TORCH_CHECK(out_dtype == at::kFloat, "dequant_rows: out_dtype must be bf16 or fp32");
    dequant_impl<float>(acc, x_scale, w_scale, bp, y);
  }
  return y;
}
