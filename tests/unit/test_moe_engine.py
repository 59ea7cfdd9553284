"""The engine with an MoE model: expert-load statistics, and EPLB re-placement between steps
that leaves the greedy tokens unchanged."""

from __future__ import annotations

import pytest

from _model_helpers import make_hf_model, save_hf_model
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from test_moe_models import VARIANTS, _tokens, engine_greedy


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    family, overrides = VARIANTS["qwen3_moe"]
    return save_hf_model(make_hf_model(family, seed=21, **overrides), tmp_path_factory.mktemp("moe"))


def _engine(path: str, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", kv_cache_memory=2**20, page_size=4,
                                  weight_cache=False, **kwargs))


def test_same_greedy_tokens_with_eplb_on_and_off(moe_path):
    prompts = [_tokens(9, seed=s) for s in range(4)]
    off = engine_greedy(moe_path, prompts, 12)
    on = engine_greedy(moe_path, prompts, 12, ep_ranks=2, eplb_redundant_experts=2, eplb_interval_steps=2)
    assert on == off


def test_load_stats_report_expert_load_and_rebalances(moe_path):
    engine = _engine(moe_path, ep_ranks=2, eplb_redundant_experts=2, eplb_interval_steps=3,
                     expert_load_window_steps=16)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [_tokens(7, seed=s) for s in range(3)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while engine.has_unfinished():
        engine.step()
    stats = engine.load_stats()["expert_load"]
    steps = engine.stats.steps
    assert stats["num_moe_layers"] == 2 and stats["num_experts"] == 8 and stats["num_slots"] == 10
    assert stats["ep_ranks"] == 2 and stats["rebalances"] == steps // 3
    assert stats["steps_in_window"] == min(steps, 16)
    # every token of every step went to top_k=2 experts in each MoE layer
    total_tokens = sum(len(p) for p in prompts) + 3 * 7  # prompts, then 7 decoded inputs each
    assert [sum(layer) for layer in stats["tokens_per_expert"]] == [2 * total_tokens] * 2
    assert len(stats["rank_tokens"]) == 2 and stats["rank_load_imbalance"] >= 1.0
    assert stats["last_rebalance_compute_s"] > 0 and "simulated" in stats["note"]
    # The placement in force covers every expert in each layer
    for layout in engine.experts.placement.slot_to_expert:
        assert sorted(set(layout)) == list(range(8)) and len(layout) == 10


def test_statistics_without_expert_parallelism(moe_path):
    engine = _engine(moe_path)
    engine.add_request("a", _tokens(5, seed=1), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    stats = engine.load_stats()["expert_load"]
    assert stats["ep_ranks"] == 1 and stats["rank_load_imbalance"] == 1.0 and stats["rebalances"] == 0
    assert engine.experts.placement is None
    assert [sum(layer) for layer in stats["tokens_per_expert"]] == [2 * 6] * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(ep_ranks=3), "divide"),
    (dict(ep_ranks=0), "ep_ranks must be"),
    (dict(eplb_redundant_experts=-1), "eplb_redundant_experts must be"),
    (dict(expert_load_window_steps=0), "expert_load_window_steps must be"),
])
def test_bad_expert_parallel_settings_are_refused(moe_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _engine(moe_path, **kwargs)


def test_dense_model_refuses_expert_parallel_settings(tmp_path):
    path = save_hf_model(make_hf_model("llama", seed=1), tmp_path)
    with pytest.raises(ValueError, match="MoE model"):
        _engine(path, ep_ranks=2)
    assert "expert_load" not in _engine(path).load_stats()
