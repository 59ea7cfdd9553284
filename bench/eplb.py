"""`xllm bench eplb`: simulated expert-parallel rank load before and after EPLB on a skewed MoE.

The model is built here: a tiny Qwen3-MoE with random weights whose router is skewed on purpose
(every token embedding carries one constant feature, and the router's weight on that feature
follows a Zipf law over the experts, so a few experts get most tokens). The same greedy workload
runs twice on one engine: first under the initial layout (experts in order, the redundant slots
on the first experts), then after one EPLB re-placement computed from the first run's measured
load. EP ranks are simulated in one process: a rank is a group of expert slots, and its modelled
time is the number of tokens its slots served; nothing here measures parallel speed-up.

Reported per run: tokens per rank (summed over MoE layers), the modelled step cost (sum over
layers of the busiest rank's tokens) against the balanced ideal (sum of the mean rank's), their
ratio, and the re-placement cost (EPLB compute + copying the expert weights into their slots).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from typing import Any

import torch

from bench.output import write_json

__all__ = ["add_arguments", "run", "build_skewed_moe"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=16, help="logical experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--layers", type=int, default=4, help="MoE layers")
    p.add_argument("--ep-ranks", type=int, default=4, help="simulated EP ranks")
    p.add_argument("--redundant", type=int, default=4, help="redundant expert slots for EPLB replicas")
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the router bias (0 = no skew)")
    p.add_argument("--requests", type=int, default=16, help="prompts per run")
    p.add_argument("--prompt-len", type=int, default=48, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="results/eplb.json", help="where to write the results")


def build_skewed_moe(path: str, experts: int, top_k: int, layers: int, skew: float, seed: int) -> None:
    """Save a tiny random Qwen3-MoE whose router favours experts by a Zipf law (see module doc)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(experts, generator=gen)  # which experts are hot: not simply the first ones
    bias = torch.tensor([(rank + 1.0) ** -skew for rank in range(experts)])[order.argsort()]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0  # the constant feature the router keys on
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.3, generator=gen)
            layer.mlp.gate.weight[:, 0] = 0.4 * bias / bias.max()
    model.save_pretrained(path)


def _workload(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(3, 512) for _ in range(args.prompt_len)] for _ in range(args.requests)]


def _run_once(engine: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> dict[str, Any]:
    from common.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
        tokens[f"{tag}-{i}"] = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    wall = time.perf_counter() - t0
    stats = engine.experts.stats()
    layers = stats["num_moe_layers"]
    return {
        "rank_tokens": stats["rank_tokens"],
        "modelled_step_cost_tokens": stats["rank_load_peak"],  # sum over layers of the busiest rank
        "balanced_cost_tokens": stats["rank_load_mean"],
        "peak_over_mean": stats["rank_load_imbalance"],
        "peak_rank_tokens_per_layer": stats["rank_load_peak"] / layers,
        "mean_rank_tokens_per_layer": stats["rank_load_mean"] / layers,
        "steps": stats["steps_under_placement"],
        "wall_s": wall,
        "tokens": [tokens[f"{tag}-{i}"] for i in range(len(prompts))],
    }


def run(args: argparse.Namespace) -> int:
    from common.engine.config import EngineConfig
    from common.engine.engine import LLMEngine

    with tempfile.TemporaryDirectory(prefix="xllm-eplb-") as path:
        build_skewed_moe(path, args.experts, args.top_k, args.layers, args.skew, args.seed)
        engine = LLMEngine(EngineConfig(
            model=path, dtype="float32", kv_cache_memory="32MiB", weight_cache=False, ep_ranks=args.ep_ranks,
            eplb_redundant_experts=args.redundant, eplb_interval_steps=0, expert_load_window_steps=100_000,
            enable_prefix_cache=False))  # the second run must compute every token the first one did
        prompts = _workload(args)
        before = _run_once(engine, prompts, args.max_tokens, "before")
        engine.experts.rebalance()  # from the first run's measured load, between steps
        cost = {"compute_s": engine.experts.last_compute_s, "apply_s": engine.experts.last_apply_s}
        predicted = engine.experts.predicted_imbalance()  # from the logical load, before measuring
        after = _run_once(engine, prompts, args.max_tokens, "after")
    same = before.pop("tokens") == after.pop("tokens")
    doc = {
        "bench": "eplb",
        "note": ("simulated EP ranks in one process: a rank is a group of expert slots and its modelled time is the "
                 "tokens its slots served; tiny random Qwen3-MoE built here with a Zipf-skewed router"),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "before": before,
        "after": after,
        "replacement_cost": cost,
        "predicted_after_peak_over_mean": predicted,
        "peak_over_mean_reduction": before["peak_over_mean"] / after["peak_over_mean"],
        "greedy_tokens_unchanged": same,
        "placement": engine.experts.placement.slot_to_expert,
    }
    for name, r in (("before EPLB", before), ("after EPLB ", after)):
        print(f"{name}: peak/mean rank load {r['peak_over_mean']:.3f} (peak {r['peak_rank_tokens_per_layer']:.0f}, "
              f"mean {r['mean_rank_tokens_per_layer']:.0f} tokens per layer), rank tokens {r['rank_tokens']}")
    print(f"re-placement: compute {1e3 * cost['compute_s']:.2f} ms, apply {1e3 * cost['apply_s']:.2f} ms; "
          f"greedy tokens unchanged: {same}")
    write_json(args.json, doc)
    return 0 if same else 1
