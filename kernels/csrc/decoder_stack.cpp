// The whole decoder stack of a small decode batch in one call (Llama-style layers on 4-bit weights).
//
// At batch 1 a SmolLM2 layer is ~9 kernel calls of a few microseconds each; from Python each also
// pays a module call, argument checks and a pybind crossing, which added up to a sizeable share of a
// decode step. Here the same kernels (q4_linear, add_rms_norm_, rotary_write_kv_,
// paged_decode_attention, silu_and_mul) run back to back from C++: same arithmetic, same results
// bit for bit, no interpreter between them.
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

namespace {

c10::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
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
  auto pages = token_pages.to(at::kLong).contiguous();
  auto lens = token_k_len.to(at::kLong).contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  c10::optional<at::Tensor> x;  // the last block's output, added to h by the next norm
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor normed = add_rms_norm_(h, x, norms[2 * l], eps, false);
    at::Tensor qkv = q4_linear(normed, linears[4 * l], qkv_out, optional_tensor(biases[4 * l]));
    rotary_write_kv_(qkv, cos, sin, kv_caches[l], slots, num_heads, num_kv_heads);
    at::Tensor q = qkv.view({T, num_heads + 2 * num_kv_heads, head_dim}).narrow(1, 0, num_heads);
    const at::Tensor& cache = kv_caches[l];
    at::Tensor attn = paged_decode_attention(q, cache[0], cache[1], pages, lens, scale, windows[l], 0.0, -1);
    at::Tensor a = q4_linear(attn.view({T, num_heads * head_dim}), linears[4 * l + 1], hidden,
                             optional_tensor(biases[4 * l + 1]));
    normed = add_rms_norm_(h, a, norms[2 * l + 1], eps, false);
    at::Tensor gate_up = q4_linear(normed, linears[4 * l + 2], 2 * intermediate, optional_tensor(biases[4 * l + 2]));
    x = q4_linear(silu_and_mul(gate_up), linears[4 * l + 3], hidden, optional_tensor(biases[4 * l + 3]));
  }
  return add_rms_norm_(h, x, final_norm, eps, false);
}
