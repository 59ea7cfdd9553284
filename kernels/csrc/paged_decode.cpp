// Decode attention over paged KV, reading pages in place (no gather copy).
//
// One query token per sequence. Work is split over (sequence, kv head) pairs; each pair reads
// its K rows once for all the query heads that share that KV head, then its V rows once.
// Scores and accumulation are fp32; the cache may be bf16 or fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
// bf16 is the top half of an fp32: a shift the compiler vectorizes (c10's conversion does not).
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
void decode_impl(const at::Tensor& q,        // [B, H, D] float32
                 const at::Tensor& k_cache,  // [KVH, N, PS, D]
                 const at::Tensor& v_cache,  // [KVH, N, PS, D]
                 const at::Tensor& pages,    // [B, P] int64
                 const at::Tensor& lens,     // [B] int64
                 at::Tensor& out,            // [B, H, D] float32
                 double scale, int64_t window, double soft_cap) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), PS = k_cache.size(2), P = pages.size(1);
  const int64_t G = H / KVH;
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t head_stride = k_cache.stride(0), page_stride = k_cache.stride(1);

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> row(D);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / KVH, h = work % KVH;
      const int64_t len = ln[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      scores.assign(G * n, 0.f);
      const float* qb = qp + (b * H + h * G) * D;
      for (int64_t t = start; t < len; ++t) {
        const T* krow = kp + h * head_stride + pg[b * P + t / PS] * page_stride + (t % PS) * D;
        float* __restrict r = row.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] = to_float(krow[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict qg = qb + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * r[d];
          s *= static_cast<float>(scale);
          if (soft_cap > 0) s = static_cast<float>(std::tanh(s / soft_cap) * soft_cap);
          scores[g * n + (t - start)] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict sg = scores.data() + g * n;
        float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sg[i]);
        float sum = 0.f;
        // A simd loop lets the compiler use the vector expf from glibc's libmvec.
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - mx); sum += sg[i]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
      }
      float* ob = op + (b * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) ob[i] = 0.f;
      for (int64_t t = start; t < len; ++t) {
        const T* vrow = vp + h * head_stride + pg[b * P + t / PS] * page_stride + (t % PS) * D;
        float* __restrict r = row.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] = to_float(vrow[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + (t - start)];
          float* __restrict og = ob + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) og[d] += p * r[d];
        }
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3), "pages must be row-contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "K and V must share a layout");
  auto qf = q.to(at::kFloat).contiguous();
  auto pg = pages.to(at::kLong).contiguous();
  auto ln = lens.to(at::kLong).contiguous();
  auto out = at::empty_like(qf);
  if (k_cache.scalar_type() == at::kBFloat16) {
    decode_impl<c10::BFloat16>(qf, k_cache, v_cache, pg, ln, out, scale, window, soft_cap);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "KV cache must be bfloat16 or float32");
    decode_impl<float>(qf, k_cache, v_cache, pg, ln, out, scale, window, soft_cap);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV");
}
