"""MoE tensors from GGUF (llama.cpp's ``ffn_gate_inp`` / ``ffn_{gate,up,down}_exps``): a tiny
Qwen3-MoE (arch ``qwen3moe``) and Mixtral (arch ``llama`` with experts, q/k permuted) written with
gguf-py's writer the way convert_hf_to_gguf.py lays them out, matched to transformers."""

from __future__ import annotations

import gguf
import pytest
import torch

from _model_helpers import PagedDriver, hf_logits, make_hf_model
from common.models.registry import load_model
from common.weights.gguf_loader import load_gguf
from test_gguf_loader import llama_cpp_permute

ARCHS = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "mixtral": gguf.MODEL_ARCH.LLAMA}


def write_moe_gguf(hf, family: str, path, norm_topk_prob: bool | None = None) -> None:
    c = hf.config
    arch = ARCHS[family]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_expert_count(c.num_experts if family == "qwen3_moe" else c.num_local_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if family == "qwen3_moe":
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if norm_topk_prob is not None:
        writer.add_expert_weights_norm(norm_topk_prob)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        t = t.float().numpy().copy()
        if name.endswith("experts.gate_up_proj"):
            layer = name.split(".")[2]
            half = t.shape[1] // 2
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", t[:, :half].copy())
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", t[:, half:].copy())
            continue
        if name.endswith("experts.down_proj"):
            writer.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", t)
            continue
        if family == "mixtral" and name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads, c.num_attention_heads)
        if family == "mixtral" and name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads, c.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family,overrides,norm", [
    ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True), None),
    ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False), False),
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48), None),
], ids=["qwen3moe", "qwen3moe_unnormalised", "mixtral"])
def test_moe_gguf_matches_transformers(family, overrides, norm, tmp_path):
    hf = make_hf_model(family, seed=17, **overrides)
    path = tmp_path / "moe.gguf"
    write_moe_gguf(hf, family, path, norm)
    config, _ = load_gguf(path)
    assert config["architectures"] == [type(hf).__name__]
    model, _ = load_model(str(path))
    tokens = list(range(5, 19))
    driver = PagedDriver(model)
    got = torch.cat([driver.step([(0, tokens[:-3])])[0]] + [driver.step([(0, [t])])[0] for t in tokens[-3:]])
    assert (got - hf_logits(hf, tokens)).abs().max() < 1e-4
