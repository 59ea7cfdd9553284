"""MoE models (Qwen3-MoE, Mixtral) equal transformers on tiny random weights.

Checkpoints are saved by transformers (per-expert safetensors), loaded with ``load_model`` and
compared against transformers' own forward: prefill then 8 paged decode steps, mixed batches,
greedy generation through ``LLM``, the bf16 path, and expert placements with replicas.
"""

from __future__ import annotations

import random

import pytest
import torch

from _model_helpers import PagedDriver, hf_logits, make_hf_model, save_hf_model
from common.models.moe import SparseMoeBlock
from common.models.registry import load_model

ATOL = 1e-3

VARIANTS = {
    # norm_topk_prob off, a dense layer (mlp_only_layers) between sparse ones
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=False, mlp_only_layers=[1])),
    # norm_topk_prob on, every second layer sparse
    "qwen3_moe_norm_step2": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
                                               norm_topk_prob=True, decoder_sparse_step=2,
                                               num_hidden_layers=4)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                                tie_word_embeddings=False)),
}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    hf = make_hf_model(family, seed=len(request.param), **overrides)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    ours, config = load_model(path)
    assert config.is_moe and config.num_experts == hf.config.num_experts
    return request.param, hf, ours, path


def test_layer_layout_follows_the_config(pair):
    name, hf, ours, _ = pair
    for i, (ref_layer, layer) in enumerate(zip(hf.model.layers, ours.model.layers)):
        ref_sparse = "SparseMoe" in type(ref_layer.mlp).__name__
        assert isinstance(layer.mlp, SparseMoeBlock) == ref_sparse, f"{name}: layer {i}"


def _prefill_and_decode(ours, tokens: list[int], steps: int = 8) -> torch.Tensor:
    driver = PagedDriver(ours, page_size=4)
    logits = [driver.step([(0, tokens)])[0]]
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(driver.step([(0, [tokens[-1]])])[0])
    return torch.cat(logits)[: len(tokens) - 1]


def test_prefill_then_8_paged_decode_steps_match_hf(pair):
    name, hf, ours, _ = pair
    tokens = _tokens(11, seed=1)
    got = _prefill_and_decode(ours, tokens)
    ref = hf_logits(hf, tokens)[: len(tokens) - 1]
    assert ref.abs().max() > 1.0, "weights too small for a meaningful comparison"
    diff = (got - ref).abs().max(dim=-1).values
    assert diff[:11].max() < ATOL, f"{name}: prefill differs by {diff[:11].max():.2e}"
    for i, d in enumerate(diff[11:]):
        assert d < ATOL, f"{name}: decode step {i} differs by {d:.2e}"
    assert ref[10:].argmax(-1).tolist() == tokens[11:]


def test_mixed_prefill_and_decode_batch_matches_hf(pair):
    name, hf, ours, _ = pair
    driver = PagedDriver(ours, page_size=4)
    a, b = _tokens(7, seed=2), _tokens(9, seed=3)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    got[0].append(driver.step([(0, a)])[0])
    a.append(int(got[0][-1][-1].argmax()))
    la, lb = driver.step([(0, [a[-1]]), (1, b[:5])])
    got[0].append(la)
    got[1].append(lb)
    a.append(int(la[-1].argmax()))
    lb, la = driver.step([(1, b[5:]), (0, [a[-1]])])
    got[0].append(la)
    got[1].append(lb)
    a.append(int(la[-1].argmax()))
    b.append(int(lb[-1].argmax()))
    la, lb = driver.step([(0, [a[-1]]), (1, [b[-1]])])
    got[0].append(la)
    got[1].append(lb)
    for seq, tokens in ((0, a), (1, b)):
        diff = (torch.cat(got[seq]) - hf_logits(hf, tokens)).abs().max()
        assert diff < ATOL, f"{name}: sequence {seq} differs by {diff:.2e}"


def engine_greedy(path: str, prompts: list[list[int]], max_tokens: int, **engine_kwargs) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one engine batch (prefills and decodes mixed)."""
    from common.engine.config import EngineConfig
    from common.engine.engine import LLMEngine
    from common.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=path, dtype="float32", kv_cache_memory=2**20, page_size=4,
                                    weight_cache=False, max_num_batched_tokens=16, **engine_kwargs))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        got[f"r{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    engine.check_integrity()
    return [got[f"r{i}"] for i in range(len(prompts))]


def hf_greedy(hf, prompt: list[int], max_tokens: int) -> list[int]:
    return hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()


def test_greedy_generation_equals_hf_generate(pair):
    name, hf, _, path = pair
    prompts = [_tokens(6, seed=10), _tokens(13, seed=11), _tokens(3, seed=12)]
    for prompt, got in zip(prompts, engine_greedy(path, prompts, 10)):
        assert got == hf_greedy(hf, prompt, 10), name


def test_replicated_expert_placement_keeps_the_logits(pair):
    """Experts laid out on more slots (hot ones replicated, slots shuffled) give the same output,
    and every slot that holds a replica of a busy expert gets a share of its tokens."""
    name, _, ours, _ = pair
    tokens = _tokens(11, seed=4)
    before = _prefill_and_decode(ours, list(tokens), steps=3)
    counts: dict[int, torch.Tensor] = {}
    blocks = ours.moe_blocks()
    layouts = []
    for block in blocks:
        experts = block.experts.num_experts
        layouts.append(list(reversed(range(experts))) + [0, 0, 1])  # expert 0 three times, 1 twice
    try:
        ours.set_expert_placement(layouts)
        ours.set_expert_counts_hook(lambda layer, e, s: counts.__setitem__(layer, s.clone()))
        after = _prefill_and_decode(ours, list(tokens), steps=3)
    finally:
        ours.set_expert_placement(None)
        ours.set_expert_counts_hook(None)
    assert (after - before).abs().max() < 1e-5, name
    assert all(c.numel() == blocks[0].experts.num_experts + 3 for c in counts.values())


def test_bad_placement_is_refused(pair):
    _, _, ours, _ = pair
    block = ours.moe_blocks()[0]
    with pytest.raises(ValueError, match="every one"):
        block.experts.set_placement([0] * block.experts.num_experts)
    with pytest.raises(ValueError, match="MoE layers"):
        ours.set_expert_placement([])


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral"])
def test_bfloat16_is_close_to_fp32_reference(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    hf = make_hf_model(family, seed=7, **overrides)
    ours, _ = load_model(save_hf_model(hf, tmp_path), dtype=torch.bfloat16)
    assert ours.moe_blocks()[0].experts.gate_up_proj.dtype == torch.bfloat16
    tokens = _tokens(12, seed=4)
    driver = PagedDriver(ours, page_size=4)
    got = torch.cat([driver.step([(0, tokens[:10])])[0], *[driver.step([(0, [t])])[0] for t in tokens[10:]]])
    ref = hf_logits(hf, tokens)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 0.08, f"bf16 relative error {rel:.3f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
