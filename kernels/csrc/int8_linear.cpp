// Weight-only int8 linear for small batches: y[M,N] = (x[M,K] @ q[N,K]^T) * scale[N] (+ bias).
//
// At decode batch sizes a linear is a pass over its weight, so its time is the weight's bytes
// over memory bandwidth; int8 rows (one fp32 scale per output channel) halve the bytes of bf16.
// Weights are widened to fp32 in registers and multiplied by fp32 activations, so the only error
// is the weight rounding. Work is split over blocks of output rows across the intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr int kRows = 4;  // output rows per block: each activation load feeds 4 weight rows
// Rows are short (K bytes), too short for the hardware prefetcher to ramp up on each; a software
// prefetch this far ahead in the (contiguous) weight stream was worth ~25% at decode sizes.
constexpr int64_t kPrefetchBytes = 4096;

// Dot products of MB activation rows with R weight rows into out[m * kRows + r]; the last
// K % 16 columns go through a masked load.
template <int MB, int R>
inline void block_dot(const float* x, int64_t K, const int8_t* w, int64_t ldw, float* out /*[MB][kRows]*/) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m128i wi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + k));
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(wi));
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + m * K + k), acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m128i wi = _mm_maskz_loadu_epi8(mask, w + r * ldw + k);
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(wi));
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * kRows + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
         at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // Activations to fp32 once (M*K floats: a few KB at decode sizes).
  std::vector<float> xf(M * K);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = xllm::to_f32(xp[i]);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float part[4 * kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
        const float* xb = xf.data() + m0 * K;
        const int8_t* wb = wp + n0 * K;
        if (rows == kRows) {
          switch (mb) {
            case 1: block_dot<1, kRows>(xb, K, wb, K, part); break;
            case 2: block_dot<2, kRows>(xb, K, wb, K, part); break;
            case 3: block_dot<3, kRows>(xb, K, wb, K, part); break;
            default: block_dot<4, kRows>(xb, K, wb, K, part); break;
          }
        } else {  // the last, partial block of rows: one row at a time
          for (int r = 0; r < rows; ++r) {
            float one[4 * kRows];
            for (int m = 0; m < mb; ++m) {
              block_dot<1, 1>(xb + m * K, K, wb + r * K, K, one);
              part[m * kRows + r] = one[0];
            }
          }
        }
        for (int m = 0; m < mb; ++m)
          for (int r = 0; r < rows; ++r) {
            float v = part[m * kRows + r] * sp[n0 + r];
            if (bp) v += bp[n0 + r];
            yp[(m0 + m) * N + n0 + r] = xllm::from_f32<T>(v);
          }
      }
    }
  });
}

}  // namespace

at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: bad shapes");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_linear: weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == w.size(0), "int8_linear: scale must be fp32 [N]");
  if (bias.has_value()) TORCH_CHECK(bias->scalar_type() == at::kFloat, "int8_linear: bias must be fp32");
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(xc, w, scale, bias, y);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: activations must be bf16 or fp32");
    run<float>(xc, w, scale, bias, y);
  }
  return y;
}
