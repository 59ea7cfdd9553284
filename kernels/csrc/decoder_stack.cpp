// The whole decoder stack of a decode batch in one call (Llama-style layers), in two variants:
//
//   decoder_stack_forward:      small batches on 4-bit weights (q4_linear);
//   decoder_stack_w8a8_forward: larger batches on the W8A8 GEMMs (quantize_rows_s8, int8_gemm on
//                               packed weights or torch's _int_mm and dequant_rows; the MLP's
//                               middle in silu_mul_quantize_rows).
//
// At batch 1 a SmolLM2 layer is ~9 kernel calls of a few microseconds each; from Python each also
// pays a module call, argument checks and a pybind crossing, which added up to a sizeable share of a
// decode step (and at 64 rows still ~5 ms of a ~45 ms step). Here the same kernels (add_rms_norm_,
// rotary_write_kv_, paged_decode_attention and the linears) run back to back from C++: same
// arithmetic in the same order, same results bit for bit, no interpreter between them.
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor pages,
                                  at::Tensor lens, double scale, int64_t window, double soft_cap,
                                  int64_t max_splits);
at::Tensor q4_linear(at::Tensor x, at::Tensor packed, int64_t out_features, c10::optional<at::Tensor> bias);
at::Tensor add_rms_norm_(at::Tensor residual, c10::optional<at::Tensor> x, at::Tensor weight, double eps,
                         bool unit_offset);
at::Tensor silu_and_mul(at::Tensor x);
void rotary_write_kv_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor kv_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads);
std::vector<at::Tensor> quantize_rows_s8(at::Tensor x, c10::optional<at::Tensor> channel_scale);
at::Tensor int8_gemm(at::Tensor xq, at::Tensor packed, int64_t n);
at::Tensor int8_gemm_dequant(at::Tensor xq, at::Tensor x_scale, at::Tensor packed, at::Tensor w_scale,
                             c10::optional<at::Tensor> bias, at::ScalarType out_dtype);
at::Tensor dequant_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale, c10::optional<at::Tensor> bias,
                        at::ScalarType out_dtype);
std::vector<at::Tensor> silu_mul_quantize_rows(at::Tensor acc, at::Tensor x_scale, at::Tensor w_scale,
                                               c10::optional<at::Tensor> bias, c10::optional<at::Tensor> channel_scale);

namespace {

c10::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// One W8A8 linear as PackedLinear runs it: per-row int8 activations (smoothed), the int8 GEMM,
// dequantize (fused into the packed kernel's store).
struct W8A8Linear {
  const at::Tensor& weight;  // packed by kernels/int8_pack.py (3-D uint8), or [K, N] int8 for _int_mm
  const at::Tensor& scale;   // [N] fp32
  c10::optional<at::Tensor> inv_smooth, bias;

  bool packed() const { return weight.dim() == 3; }
  at::Tensor accumulate(const at::Tensor& xq) const {
    return packed() ? int8_gemm(xq, weight, scale.numel()) : at::_int_mm(xq, weight);
  }
  at::Tensor matmul(const at::Tensor& xq, const at::Tensor& x_scale, at::ScalarType dtype) const {
    if (packed()) return int8_gemm_dequant(xq, x_scale, weight, scale, bias, dtype);
    return dequant_rows(accumulate(xq), x_scale, scale, bias, dtype);
  }
  at::Tensor operator()(const at::Tensor& x) const {
    const std::vector<at::Tensor> q = quantize_rows_s8(x, inv_smooth);
    return matmul(q[0], q[1], x.scalar_type());
  }
};

struct StackShape {
  int64_t num_heads, num_kv_heads, head_dim;
};

// Rotary and the KV write, then attention over the pages: the layer's attention output [T, H * D].
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                  const at::Tensor& slots, const at::Tensor& pages, const at::Tensor& lens, const StackShape& s,
                  double scale, int64_t window) {
  const int64_t T = qkv.size(0);
  rotary_write_kv_(qkv, cos, sin, cache, slots, s.num_heads, s.num_kv_heads);
  at::Tensor q = qkv.view({T, s.num_heads + 2 * s.num_kv_heads, s.head_dim}).narrow(1, 0, s.num_heads);
  return paged_decode_attention(q, cache[0], cache[1], pages, lens, scale, window, 0.0, -1)
      .view({T, s.num_heads * s.head_dim});
}

}  // namespace

// h [T, hidden]: the embedded tokens, updated in place into the residual stream. Per layer l:
// norms[2l], norms[2l + 1] (input and post-attention RMSNorm weights), linears[4l .. 4l + 3] (packed
// qkv, o, gate_up, down), biases[4l .. 4l + 3] (fp32 or empty), kv_caches[l], windows[l] (-1: none).
// Returns the final norm's output [T, hidden].
at::Tensor decoder_stack_forward(at::Tensor h, std::vector<at::Tensor> norms, at::Tensor final_norm,
                                 std::vector<at::Tensor> linears, std::vector<at::Tensor> biases,
                                 std::vector<at::Tensor> kv_caches, std::vector<int64_t> windows, at::Tensor cos,
                                 at::Tensor sin, at::Tensor slot_mapping, at::Tensor token_pages,
                                 at::Tensor token_k_len, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t intermediate, double eps, double scale) {
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decoder_stack_forward: h must be contiguous [T, hidden]");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(linears.size()) == 4 * L &&
                  static_cast<int64_t>(biases.size()) == 4 * L && static_cast<int64_t>(windows.size()) == L,
              "decoder_stack_forward: per-layer lists do not agree");
  const int64_t T = h.size(0), hidden = h.size(1);
  const int64_t qkv_out = (num_heads + 2 * num_kv_heads) * head_dim;
  const StackShape shape{num_heads, num_kv_heads, head_dim};
  auto pages = token_pages.to(at::kLong).contiguous();
  auto lens = token_k_len.to(at::kLong).contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  c10::optional<at::Tensor> x;  // the last block's output, added to h by the next norm
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor normed = add_rms_norm_(h, x, norms[2 * l], eps, false);
    at::Tensor qkv = q4_linear(normed, linears[4 * l], qkv_out, optional_tensor(biases[4 * l]));
    at::Tensor attn = attend(qkv, cos, sin, kv_caches[l], slots, pages, lens, shape, scale, windows[l]);
    at::Tensor a = q4_linear(attn, linears[4 * l + 1], hidden, optional_tensor(biases[4 * l + 1]));
    normed = add_rms_norm_(h, a, norms[2 * l + 1], eps, false);
    at::Tensor gate_up = q4_linear(normed, linears[4 * l + 2], 2 * intermediate, optional_tensor(biases[4 * l + 2]));
    x = q4_linear(silu_and_mul(gate_up), linears[4 * l + 3], hidden, optional_tensor(biases[4 * l + 3]));
  }
  return add_rms_norm_(h, x, final_norm, eps, false);
}

// The W8A8 variant. Per linear i (4 per layer: qkv, o, gate_up, down): weights[i] packed (3-D
// uint8, kernels/int8_pack.py) or int8 [K, N],
// scales[i] fp32 [N], inv_smooth[i] fp32 [K] or empty, biases[i] fp32 [N] or empty; the rest as above.
at::Tensor decoder_stack_w8a8_forward(at::Tensor h, std::vector<at::Tensor> norms, at::Tensor final_norm,
                                      std::vector<at::Tensor> weights, std::vector<at::Tensor> scales,
                                      std::vector<at::Tensor> inv_smooth, std::vector<at::Tensor> biases,
                                      std::vector<at::Tensor> kv_caches, std::vector<int64_t> windows,
                                      at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                                      at::Tensor token_pages, at::Tensor token_k_len, int64_t num_heads,
                                      int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decoder_stack_w8a8_forward: h must be contiguous [T, hidden]");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(weights.size()) == 4 * L &&
                  static_cast<int64_t>(scales.size()) == 4 * L && static_cast<int64_t>(inv_smooth.size()) == 4 * L &&
                  static_cast<int64_t>(biases.size()) == 4 * L && static_cast<int64_t>(windows.size()) == L,
              "decoder_stack_w8a8_forward: per-layer lists do not agree");
  const StackShape shape{num_heads, num_kv_heads, head_dim};
  auto pages = token_pages.to(at::kLong).contiguous();
  auto lens = token_k_len.to(at::kLong).contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  auto linear = [&](int64_t i) {
    return W8A8Linear{weights[i], scales[i], optional_tensor(inv_smooth[i]), optional_tensor(biases[i])};
  };
  c10::optional<at::Tensor> x;  // the last block's output, added to h by the next norm
  for (int64_t l = 0; l < L; ++l) {
    const W8A8Linear qkv_proj = linear(4 * l), o_proj = linear(4 * l + 1);
    const W8A8Linear gate_up = linear(4 * l + 2), down = linear(4 * l + 3);
    at::Tensor normed = add_rms_norm_(h, x, norms[2 * l], eps, false);
    at::Tensor attn = attend(qkv_proj(normed), cos, sin, kv_caches[l], slots, pages, lens, shape, scale, windows[l]);
    normed = add_rms_norm_(h, o_proj(attn), norms[2 * l + 1], eps, false);
    // The gated MLP as w8a8_silu_mlp runs it: no bf16 tensor between the two GEMMs.
    const std::vector<at::Tensor> xq = quantize_rows_s8(normed, gate_up.inv_smooth);
    const std::vector<at::Tensor> hq = silu_mul_quantize_rows(gate_up.accumulate(xq[0]), xq[1], gate_up.scale,
                                                              gate_up.bias, down.inv_smooth);
    x = down.matmul(hq[0], hq[1], normed.scalar_type());
  }
  return add_rms_norm_(h, x, final_norm, eps, false);
}
