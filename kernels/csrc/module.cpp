// Python bindings of the CPU kernels (one extension module for all sources in this folder).
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap,
                                  int64_t max_splits);
at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> bias);
at::Tensor q4_linear(at::Tensor x, at::Tensor packed, int64_t out_features, c10::optional<at::Tensor> bias);
at::Tensor q8_linear(at::Tensor x, at::Tensor packed, int64_t out_features, c10::optional<at::Tensor> bias);
at::Tensor argmax_rows(at::Tensor logits);
bool int8_gemm_supported();
at::Tensor int8_gemm(at::Tensor xq, at::Tensor packed, int64_t n);
at::Tensor int8_gemm_dequant(at::Tensor xq, at::Tensor x_scale, at::Tensor packed, at::Tensor w_scale,
                             c10::optional<at::Tensor> bias, at::ScalarType out_dtype);
std::vector<at::Tensor> quantize_rows_s8(at::Tensor x, c10::optional<at::Tensor> channel_scale);
at::Tensor dequant_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale, c10::optional<at::Tensor> bias,
                        at::ScalarType out_dtype);
std::vector<at::Tensor> silu_mul_quantize_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale,
                                               c10::optional<at::Tensor> bias, c10::optional<at::Tensor> channel_scale);
at::Tensor add_rms_norm_(at::Tensor residual, c10::optional<at::Tensor> x, at::Tensor weight, double eps,
                         bool unit_offset);
at::Tensor silu_and_mul(at::Tensor x);
void rotary_write_kv_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads);
at::Tensor decoder_stack_forward(at::Tensor h, std::vector<at::Tensor> norms, at::Tensor final_norm,
                                 std::vector<at::Tensor> linears, std::vector<at::Tensor> biases,
                                 std::vector<at::Tensor> kv_caches, std::vector<int64_t> windows, at::Tensor cos,
                                 at::Tensor sin, at::Tensor slot_mapping, at::Tensor token_pages,
                                 at::Tensor token_k_len, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t intermediate, double eps, double scale);
at::Tensor decoder_stack_w8a8_forward(at::Tensor h, std::vector<at::Tensor> norms, at::Tensor final_norm,
                                      std::vector<at::Tensor> weights, std::vector<at::Tensor> scales,
                                      std::vector<at::Tensor> inv_smooth, std::vector<at::Tensor> biases,
                                      std::vector<at::Tensor> kv_caches, std::vector<int64_t> windows,
                                      at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                                      at::Tensor token_pages, at::Tensor token_k_len, int64_t num_heads,
                                      int64_t num_kv_heads, int64_t head_dim, double eps, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No kernel touches a Python object: drop the GIL while one runs, so the engine thread can plan
  // the next step beside the forward pass (common.engine.overlap).
  using NoGil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over paged KV (bf16, fp32 or int8 pages); max_splits: chunks per context "
        "(-1 = chosen by batch size and context length, 1 = never split)",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("pages"),
        pybind11::arg("lens"), pybind11::arg("scale"), pybind11::arg("window"), pybind11::arg("soft_cap"),
        pybind11::arg("max_splits") = -1, NoGil());
  m.def("int8_linear", &int8_linear, "weight-only int8 linear for small batches", NoGil());
  m.def("q4_linear", &q4_linear, "4-bit (GGUF Q4_0/Q4_1 blocks) linear for small batches", NoGil());
  m.def("q8_linear", &q8_linear, "8-bit (GGUF Q8_0 blocks) linear for small batches", NoGil());
  m.def("argmax_rows", &argmax_rows, "first index of each fp32 row's maximum (NaN counts as largest), as torch.argmax",
        NoGil());
  m.def("int8_gemm_supported", &int8_gemm_supported, "whether int8_gemm was built (AVX512-VNNI)");
  m.def("int8_gemm", &int8_gemm, "int8 GEMM on weights packed by kernels/int8_pack.py: int32, as torch._int_mm",
        NoGil());
  m.def("int8_gemm_dequant", &int8_gemm_dequant,
        "int8_gemm with dequant_rows fused into its store: acc * x_scale[m] * w_scale[n] (+ bias)", NoGil());
  m.def("quantize_rows_s8", &quantize_rows_s8, "per-row symmetric int8 quantization of activations",
        pybind11::arg("x"), pybind11::arg("channel_scale") = pybind11::none(), NoGil());
  m.def("dequant_rows", &dequant_rows, "int32 GEMM result times row and column scales (+ bias)", NoGil());
  m.def("silu_mul_quantize_rows", &silu_mul_quantize_rows,
        "gate/up int32 GEMM result -> silu(gate) * up -> per-row int8 input of the down projection", NoGil());
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x (optional), then RMSNorm of the residual", NoGil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a fused [.., 2I] projection", NoGil());
  m.def("decoder_stack_forward", &decoder_stack_forward,
        "a small decode batch through every Llama-style layer on 4-bit weights (common/models/decoder_stack.py)",
        NoGil());
  m.def("decoder_stack_w8a8_forward", &decoder_stack_w8a8_forward,
        "a decode batch through every Llama-style layer on the W8A8 GEMMs (common/models/decoder_stack.py)",
        NoGil());
  m.def("rotary_write_kv_", &rotary_write_kv_, "rotary on q/k in place, then k/v into the paged cache", NoGil());
}
