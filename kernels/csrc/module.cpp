// Python bindings of the CPU kernels (one extension module for all sources in this folder).
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap);
at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> bias);
at::Tensor add_rms_norm_(at::Tensor residual, c10::optional<at::Tensor> x, at::Tensor weight, double eps,
                         bool unit_offset);
at::Tensor silu_and_mul(at::Tensor x);
void rotary_write_kv_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV");
  m.def("int8_linear", &int8_linear, "weight-only int8 linear for small batches");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x (optional), then RMSNorm of the residual");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a fused [.., 2I] projection");
  m.def("rotary_write_kv_", &rotary_write_kv_, "rotary on q/k in place, then k/v into the paged cache");
}
