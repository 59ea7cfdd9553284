"""Prefill -> decode KV hand-off between two engines on the same tiny random model (fp32)."""

from __future__ import annotations

import inspect

import pytest
import torch
from _model_helpers import make_hf_model, save_hf_model

from common.engine import EngineConfig, LLMEngine, SamplingParams
from common.engine.block_manager import NoFreePagesError
from services.worker.engine_api import EngineHandoff, EngineStoreHooks, WorkerEngine

PAGE = 4
# One page across all layers: 3 layers x K/V x 2 kv heads x 4 tokens x head_dim 16 x fp32.
PAGE_BYTES = 3 * 2 * 2 * PAGE * 16 * 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_hf_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("tiny-llama"))


def make_engine(path: str, pages: int = 64, batch_tokens: int = 8, **kw) -> LLMEngine:
    # 8-token steps: every prompt below is prefilled in several chunks.
    return LLMEngine(EngineConfig(
        model=path, dtype="float32", kv_cache_memory=pages * PAGE_BYTES, page_size=PAGE,
        max_num_batched_tokens=batch_tokens, **kw,
    ))


def drain(engine: LLMEngine, outputs: dict[str, list] | None = None) -> dict[str, list]:
    """Step until nothing is left to compute; the SequenceOutputs per request."""
    outputs = {} if outputs is None else outputs
    for _ in range(2000):  # a cap, so a scheduling bug fails the test instead of hanging it
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished(), "the engine did not drain"
    return outputs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [prompt(1, 37), prompt(2, 21), prompt(3, 16)]


@pytest.fixture(scope="module")
def reference(tiny_path) -> list[list[int]]:
    engine = make_engine(tiny_path)
    refs = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", p, GREEDY)
        refs.append(tokens(drain(engine)[f"ref{i}"]))
    return refs


def hand_off(a: LLMEngine, b: LLMEngine, rid: str, params: SamplingParams, layer_split: int = 2) -> list[int]:
    """Export a held request from A into B (layers in two chunks); returns the output ids moved."""
    exp = a.handoff.export_kv(rid)
    assert exp.num_tokens == len(exp.prompt_ids) and len(exp.output_ids) == 1
    assert exp.layer(0).shape == (2, 2, len(exp.page_ids), PAGE, 16) and exp.layer(0).is_contiguous()
    pages = b.handoff.reserve_transfer(
        rid, exp.prompt_ids, exp.output_ids, params, num_tokens=exp.num_tokens, logprobs=exp.logprobs,
        num_cached_tokens=exp.num_cached_tokens, generator_state=exp.generator_state,
    )
    assert len(pages) == len(exp.page_ids)
    assert b.load_stats()["incoming"] >= 1
    b.handoff.write_kv_layers(rid, 0, exp.layers(0, layer_split))
    b.handoff.write_kv_layers(rid, layer_split, exp.layers(layer_split, exp.num_layers))
    b.handoff.commit_transfer(rid)
    return exp.output_ids


def test_handoff_gives_the_same_tokens_as_one_engine(tiny_path, reference):
    a, b = make_engine(tiny_path), make_engine(tiny_path)
    for i, p in enumerate(PROMPTS):
        a.add_request(f"r{i}", p, GREEDY, hold_after_prefill=True)
    first = drain(a)
    assert sorted(a.handoff.held_requests()) == ["r0", "r1", "r2"]
    assert all(len(outs) == 1 and outs[0].held and outs[0].finish_reason is None for outs in first.values())
    assert a.load_stats()["held"] == 3 and a.load_stats()["running"] == 0
    used_before = a.block_manager.num_used_pages
    moved = {}
    for i in range(len(PROMPTS)):
        moved[f"r{i}"] = hand_off(a, b, f"r{i}", GREEDY, layer_split=1 + i % 2)
        a.handoff.release_held(f"r{i}")
    assert used_before > 0 and a.block_manager.num_used_pages == 0
    assert a.handoff.held_requests() == [] and a.num_requests == 0
    # Full prompt pages stay in A's prefix cache, as for any finished sequence.
    assert a.block_manager.num_cached_pages > 0
    rest = drain(b)
    for i in range(len(PROMPTS)):
        got = moved[f"r{i}"] + tokens(rest[f"r{i}"])
        assert got == reference[i]
        assert rest[f"r{i}"][-1].finish_reason == "length"
        assert rest[f"r{i}"][-1].num_output_tokens == GREEDY.max_tokens
    assert b.block_manager.num_used_pages == 0 and b.num_requests == 0
    stats = b.load_stats()
    assert stats["incoming"] == 0 and stats["generated_tokens_total"] == 3 * (GREEDY.max_tokens - 1)
    a.check_integrity()
    b.check_integrity()


def test_handoff_carries_logprobs_and_seeded_sampling(tiny_path):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, logprobs=2,
                            repetition_penalty=1.3)
    alone = make_engine(tiny_path)
    alone.add_request("x", PROMPTS[1], params)
    want = drain(alone)["x"]
    a, b = make_engine(tiny_path), make_engine(tiny_path)
    a.add_request("x", PROMPTS[1], params, hold_after_prefill=True)
    drain(a)
    exp = a.handoff.export_kv("x")
    assert exp.logprobs is not None and exp.logprobs[0]["token_id"] == exp.output_ids[0]
    hand_off(a, b, "x", params)
    a.handoff.release_held("x")
    got = drain(b)["x"]
    assert exp.output_ids + tokens(got) == tokens(want)
    seq_lps = [lp for o in got for lp in o.new_logprobs]
    assert [lp.token_id for lp in seq_lps] == tokens(want)[1:]


def test_resume_held_gives_the_same_tokens(tiny_path, reference):
    a = make_engine(tiny_path)
    a.add_request("r0", PROMPTS[0], GREEDY, hold_after_prefill=True)
    outs = drain(a)
    assert a.handoff.held_requests() == ["r0"] and not a.has_unfinished()
    a.handoff.resume_held("r0")
    assert a.handoff.held_requests() == []
    drain(a, outs)
    assert tokens(outs["r0"]) == reference[0]
    assert sum(o.held for o in outs["r0"]) == 1  # held once, not again after resuming
    assert a.block_manager.num_used_pages == 0
    a.check_integrity()


def test_sequence_preempted_before_its_first_token_is_still_held(tiny_path, reference):
    # 12 pages: the offline hold request (10 pages of prompt) and the growing online one
    # (up to 10 pages) cannot both fit, so the offline one is preempted mid-prefill, and only
    # gets its first token once the online one is done.
    a = make_engine(tiny_path, pages=12)
    a.add_request("online", prompt(9, 8), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    a.add_request("hold", PROMPTS[0], GREEDY, priority="offline", hold_after_prefill=True)
    outs = drain(a)
    assert outs["online"][-1].finish_reason == "length"
    assert a.stats.preemptions > 0
    assert a.handoff.held_requests() == ["hold"]
    assert a.handoff._held["hold"].num_preemptions > 0
    assert outs["hold"][-1].held and tokens(outs["hold"]) == reference[0][:1]
    a.handoff.resume_held("hold")
    drain(a, outs)
    assert tokens(outs["hold"]) == reference[0]
    a.check_integrity()


def test_first_token_that_finishes_is_not_held(tiny_path):
    a = make_engine(tiny_path)
    a.add_request("one", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=1), hold_after_prefill=True)
    (out,) = drain(a)["one"]
    assert out.finish_reason == "length" and not out.held
    assert a.handoff.held_requests() == [] and a.num_requests == 0 and a.block_manager.num_used_pages == 0
    a.check_integrity()


def test_hold_needs_n_1(tiny_path):
    a = make_engine(tiny_path, pages=16)
    with pytest.raises(ValueError, match="n == 1"):
        a.add_request("n2", PROMPTS[2], SamplingParams(n=2, max_tokens=2), hold_after_prefill=True)
    with pytest.raises(ValueError, match="n == 1"):
        a.handoff.reserve_transfer("n2", PROMPTS[2], [5], SamplingParams(n=2, max_tokens=2), num_tokens=16)
    assert a.num_requests == 0


def test_abort_held_and_incoming_frees_pages(tiny_path):
    a = make_engine(tiny_path, pages=32)
    a.add_request("h", PROMPTS[0], GREEDY, hold_after_prefill=True)
    drain(a)
    exp = a.handoff.export_kv("h")
    pages = a.handoff.reserve_transfer("in", PROMPTS[1], [7, 8], GREEDY, num_tokens=len(PROMPTS[1]) + 1)
    assert len(pages) == 6
    stats = a.load_stats()
    assert stats["held"] == 1 and stats["incoming"] == 1
    assert a.block_manager.num_used_pages == len(exp.page_ids) + len(pages)
    with pytest.raises(ValueError, match="already in flight"):
        a.handoff.reserve_transfer("h", PROMPTS[1], [7], GREEDY, num_tokens=3)
    assert a.abort_request("h") and a.abort_request("in")
    assert a.block_manager.num_used_pages == 0 and a.num_requests == 0
    assert a.load_stats()["held"] == 0 and a.load_stats()["incoming"] == 0
    with pytest.raises(KeyError):
        a.handoff.export_kv("h")
    a.handoff.reserve_transfer("c", PROMPTS[1], [7], GREEDY, num_tokens=len(PROMPTS[1]))
    a.handoff.cancel_transfer("c")
    assert a.block_manager.num_used_pages == 0 and a.num_requests == 0
    a.check_integrity()


def test_reserve_without_room_raises_and_leaks_nothing(tiny_path):
    b = make_engine(tiny_path, pages=16)
    b.add_request("busy", PROMPTS[0], GREEDY)  # 10 pages once prefilled
    while b.block_manager.num_used_pages < 10:
        b.step()
    used = b.block_manager.num_used_pages
    with pytest.raises(NoFreePagesError):
        b.handoff.reserve_transfer("big", prompt(5, 30), [9], GREEDY, num_tokens=30)  # 8 pages
    assert b.block_manager.num_used_pages == used and b.num_requests == 1
    assert b.load_stats()["incoming"] == 0 and b.scheduler.num_running == 1  # nobody was preempted
    b.check_integrity()
    # Evictable cached pages do count as room.
    drain(b)
    assert b.block_manager.num_cached_pages > 0
    short = SamplingParams(temperature=0.0, max_tokens=2)
    pages = b.handoff.reserve_transfer("big", prompt(5, 60), [9], short, num_tokens=60)
    assert len(pages) == 15
    b.handoff.cancel_transfer("big")
    b.check_integrity()


def test_write_validation(tiny_path):
    a, b = make_engine(tiny_path), make_engine(tiny_path)
    a.add_request("v", PROMPTS[1], GREEDY, hold_after_prefill=True)
    drain(a)
    exp = a.handoff.export_kv("v")
    b.handoff.reserve_transfer("v", exp.prompt_ids, exp.output_ids, GREEDY, num_tokens=exp.num_tokens)
    good = exp.layer(0)
    with pytest.raises(ValueError, match="shape"):
        b.handoff.write_kv_layers("v", 0, [good[:, :, :-1]])
    with pytest.raises(ValueError, match="out of range"):
        b.handoff.write_kv_layers("v", 2, [good, good])
    b.handoff.write_kv_layers("v", 0, [good.to(torch.float16)])  # any convertible dtype
    with pytest.raises(ValueError, match="never written"):
        b.handoff.commit_transfer("v")
    with pytest.raises(ValueError, match="num_tokens"):
        b.handoff.reserve_transfer("w", exp.prompt_ids, exp.output_ids, GREEDY, num_tokens=len(exp.prompt_ids) + 1)
    with pytest.raises(KeyError):
        b.handoff.write_kv_layers("nope", 0, [good])
    b.handoff.cancel_transfer("v")
    a.handoff.release_held("v")
    assert b.block_manager.num_used_pages == 0 and a.block_manager.num_used_pages == 0
    a.check_integrity()
    b.check_integrity()


def test_engine_kv_properties(tiny_path):
    a = make_engine(tiny_path, pages=8)
    assert a.num_layers == 3 and a.kv_dtype == torch.float32 and a.kv_page_shape == (2, 2, PAGE, 16)
    assert a.kv_namespace == a.block_manager.namespace and tiny_path in a.kv_namespace


def test_the_engine_is_what_the_worker_expects(tiny_path):
    a = make_engine(tiny_path, pages=8)
    for part, protocol in ((a, WorkerEngine), (a.handoff, EngineHandoff), (a.store_hooks, EngineStoreHooks)):
        assert isinstance(part, protocol)  # every member is there
        for name, member in vars(protocol).items():
            if callable(member) and not name.startswith("_"):
                want = [(p.name, p.kind) for p in inspect.signature(member).parameters.values()]
                got = [(p.name, p.kind) for p in inspect.signature(getattr(type(part), name)).parameters.values()]
                assert got == want, f"{type(part).__name__}.{name} takes {got}, the worker calls it with {want}"
