"""DP-balance migration at the engine level: a running decode sequence moves between two engines
(its KV, or recomputed on the target) and continues with exactly the tokens one engine gives."""

from __future__ import annotations

import pytest
from _model_helpers import make_hf_model, save_hf_model
from test_engine_handoff import drain, make_engine, prompt, tokens

from common.engine import LLMEngine, SamplingParams
from common.engine.block_manager import NoFreePagesError

GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True,
                        frequency_penalty=0.5, logprobs=2)
PROMPTS = [prompt(5, 29), prompt(6, 12)]
STEPS_BEFORE_MOVE = 5  # steps on the source: prefill chunks and a few decode steps


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_hf_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("tiny-llama-mig"))


def served_whole(path: str, params: SamplingParams) -> dict[str, list]:
    engine = make_engine(path)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params)
    return drain(engine)


def step_until_decoding(engine: LLMEngine, rid: str, outputs: dict[str, list]) -> None:
    for _ in range(200):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if len(outputs.get(rid, ())) >= 3:
            return
    raise AssertionError(f"{rid} never reached its decode phase")


def migrate(a: LLMEngine, b: LLMEngine, rid: str, params: SamplingParams, recompute: bool) -> None:
    num_computed = a.handoff.hold_running(rid)
    exp = a.handoff.export_kv(rid)
    assert exp.num_tokens == num_computed == len(exp.prompt_ids) + len(exp.output_ids) - 1
    b.handoff.reserve_transfer(rid, exp.prompt_ids, exp.output_ids, params, logprobs=exp.logprobs,
                               num_tokens=0 if recompute else exp.num_tokens, recompute=recompute)
    if not recompute:
        b.handoff.write_kv_layers(rid, 0, exp.layers(0, exp.num_layers))
        b.handoff.commit_transfer(rid)
    a.handoff.release_held(rid)


@pytest.mark.parametrize("recompute", [False, True], ids=["kv", "recompute"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded-penalties-logprobs"])
def test_a_migrated_sequence_continues_exactly(tiny_path, params: SamplingParams, recompute: bool) -> None:
    reference = served_whole(tiny_path, params)
    a, b = make_engine(tiny_path), make_engine(tiny_path)
    for i, p in enumerate(PROMPTS):
        a.add_request(f"r{i}", p, params)
    outputs: dict[str, list] = {}
    step_until_decoding(a, "r0", outputs)
    migrate(a, b, "r0", params, recompute)
    assert [s.request_id for s in a.scheduler.running] == ["r1"]  # r0 left A, r1 stays
    drain(a, outputs)
    drain(b, outputs)
    for rid in ("r0", "r1"):
        assert tokens(outputs[rid]) == tokens(reference[rid])
        if params.logprobs is not None:
            got = [lp for o in outputs[rid] for lp in o.new_logprobs]
            want = [lp for o in reference[rid] for lp in o.new_logprobs]
            assert [g.token_id for g in got] == [w.token_id for w in want]
    a.check_integrity()
    b.check_integrity()
    assert a.block_manager.num_used_pages == 0 or a.num_requests == 0


def test_a_refused_migration_resumes_on_the_source(tiny_path) -> None:
    reference = served_whole(tiny_path, GREEDY)
    a, tiny = make_engine(tiny_path), make_engine(tiny_path, pages=16)
    # 9 of the target's 16 pages are taken by a sequence arriving there: r0 needs 8.
    tiny.handoff.reserve_transfer("filler", prompt(9, 36), [5], SamplingParams(max_tokens=2), num_tokens=36)
    for i, p in enumerate(PROMPTS):
        a.add_request(f"r{i}", p, GREEDY)
    outputs: dict[str, list] = {}
    step_until_decoding(a, "r0", outputs)
    a.handoff.hold_running("r0")
    exp = a.handoff.export_kv("r0")
    for recompute in (False, True):
        with pytest.raises(NoFreePagesError):
            tiny.handoff.reserve_transfer("r0", exp.prompt_ids, exp.output_ids, GREEDY,
                                          num_tokens=0 if recompute else exp.num_tokens, recompute=recompute)
    assert tiny.num_requests == 1 and tiny.block_manager.num_used_pages == 9  # nothing of r0 stayed
    a.handoff.resume_held("r0")
    drain(a, outputs)
    assert {rid: tokens(outs) for rid, outs in outputs.items()} == {rid: tokens(r) for rid, r in reference.items()}


def test_only_decoding_single_sequences_are_held(tiny_path) -> None:
    engine = make_engine(tiny_path)
    engine.add_request("waiting", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="not running|decode phase"):
        engine.handoff.hold_running("waiting")  # not admitted yet
    engine.step()  # first prefill chunk of 8 tokens: no output yet
    with pytest.raises(ValueError, match="decode phase"):
        engine.handoff.hold_running("waiting")
    with pytest.raises(ValueError, match="single running sequence"):
        engine.handoff.hold_running("unknown")
    engine.add_request("two", PROMPTS[1], SamplingParams(max_tokens=4, n=2, seed=1))
    with pytest.raises(ValueError, match="single running sequence"):
        engine.handoff.hold_running("two")
    outputs: dict[str, list] = {}
    step_until_decoding(engine, "waiting", outputs)
    engine.handoff.hold_running("waiting")
    with pytest.raises(ValueError, match="held"):
        engine.handoff.hold_running("waiting")  # parked once
    engine.handoff.resume_held("waiting")
    drain(engine, outputs)
    engine.check_integrity()
