"""Overlap scheduling (common.engine.overlap): the engine planning step N+1 beside step N's forward
pass gives, step for step, the outputs of the serial engine on the default model (its own dtype,
whose small-batch GEMMs make a row's numbers depend on its batch): greedy and seeded sampling,
stop tokens and max_tokens ending sequences mid-batch, arrivals, aborts and stop strings between
steps, preemption, online work preempting offline, structured outputs, speculative decoding and
beam search."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from common.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from common.engine.config import DEFAULT_OVERLAP_MIN_BATCH, add_engine_arguments, engine_config_from_args
from common.engine.kv_cache import kv_page_bytes
from common.engine.overlap import resolve_min_batch
from common.settings import SettingsParser

TEXTS = [
    "The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "def fibonacci(n):\n    ",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of",
    "Once upon a time, in a land far away, there lived",
    "The three laws of thermodynamics are",
]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
          "additionalProperties": False}

Script = dict[int, list[Callable[[LLMEngine], None]]]


def make_pair(smollm_path: str, overlap_min_batch: int = 1, **kw) -> dict[str, LLM]:
    return {"off": LLM(smollm_path, overlap_schedule="off", **kw),
            "on": LLM(smollm_path, overlap_schedule="on", overlap_min_batch=overlap_min_batch, **kw)}


@pytest.fixture(scope="module")
def pair(smollm_path):
    """The default model in its default dtype, serial and overlapped (from two rows a step), with
    chunked prefill and at most four sequences in a batch."""
    return make_pair(smollm_path, kv_cache_memory="32MiB", max_num_batched_tokens=48, max_num_seqs=4,
                     overlap_min_batch=2)


@pytest.fixture(scope="module")
def ids(pair):
    tokenizer = pair["off"].tokenizer
    return [tokenizer.encode(t) for t in TEXTS]


def drive(engine: LLMEngine, script: Script, max_steps: int = 400) -> list[list[tuple]]:
    """Every step's outputs, with the script's actions applied before the steps they are keyed by;
    checks that nothing is emitted for a choice after its end and that every page comes back."""
    steps: list[list[tuple]] = []
    ended: set[tuple[str, int]] = set()
    for step in range(max_steps):
        for action in script.get(step, ()):
            action(engine)
        if not engine.has_unfinished() and not any(k > step for k in script):
            break
        outs = engine.step()
        for out in outs:
            key = (out.request_id, out.index)
            assert key not in ended, f"{key} emitted after it finished"
            if out.finish_reason is not None:
                ended.add(key)
        steps.append([(o.request_id, o.index, o.new_token_ids, o.finish_reason,
                       [lp.logprob for lp in o.new_logprobs] if o.new_logprobs else None) for o in outs])
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_pages == 0
    engine.check_integrity()
    return steps


def add(rid: str, prompt: list[int], params: SamplingParams, priority: str = "online"):
    return lambda engine: engine.add_request(rid, prompt, params, priority=priority)


def both(pair: dict[str, LLM], make_script: Callable[[], Script]) -> list[list[tuple]]:
    """Run the script on both engines; assert equal step-by-step outputs; return them."""
    serial = drive(pair["off"].engine, make_script())
    overlapped = drive(pair["on"].engine, make_script())
    assert overlapped == serial
    return serial


def tokens_of(steps: list[list[tuple]], rid: str, index: int = 0) -> list[int]:
    return [t for outs in steps for (r, i, toks, _, _) in outs if (r, i) == (rid, index) for t in toks]


def finish_of(steps: list[list[tuple]], rid: str, index: int = 0) -> str | None:
    return next(f for outs in steps for (r, i, _, f, _) in outs if (r, i) == (rid, index) and f is not None)


def test_greedy_with_stops_lengths_and_arrivals_matches_serial(pair, ids):
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    # A stop token each sequence meets part way: taken from its own undisturbed output (both engines
    # run it, so that their prefix caches stay alike).
    reference = both(pair, lambda: {0: [add(f"r{k}", p, plain) for k, p in enumerate(ids)]})
    stops = {k: tokens_of(reference, f"r{k}")[6 + 2 * k] for k in range(len(ids))}

    def script() -> Script:
        return {
            0: [add(f"s{k}", ids[k], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stops[k]]))
                for k in range(3)]
            + [add("short", ids[3], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))],
            9: [add("late", ids[4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))],
            14: [add("later", ids[5], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stops[5]]))],
        }

    steps = both(pair, script)
    for k in range(3):
        assert finish_of(steps, f"s{k}") == "stop" and tokens_of(steps, f"s{k}")[-1] == stops[k]
    assert finish_of(steps, "short") == "length" and len(tokens_of(steps, "short")) == 5
    assert len(tokens_of(steps, "late")) == 12
    # The overlap did happen: batches launched from inputs laid out beside the step before, and
    # plans that a stop token changed were laid out again.
    pipeline = pair["on"].engine.pipeline
    assert pipeline.steps_from_plan > 5 and pipeline.steps_relaid > 0


def test_seeded_sampling_penalties_and_logprobs_match_serial(pair, ids):
    def script() -> Script:
        return {0: [
            add("seeded", ids[0], SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=16)),
            add("penal", ids[1], SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5,
                                                frequency_penalty=0.3, max_tokens=16, logprobs=2)),
            add("minp", ids[2], SamplingParams(temperature=1.0, seed=5, min_p=0.1, top_k=20, min_tokens=4,
                                               max_tokens=14)),
        ]}

    steps = both(pair, script)
    assert len(tokens_of(steps, "seeded", 1)) > 0 and steps[-1]


def test_abort_and_stop_string_between_steps(pair, ids):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    def script() -> Script:
        return {
            0: [add(f"a{k}", ids[k], greedy) for k in range(4)],
            8: [lambda engine: engine.abort_request("a1")],
            11: [lambda engine: engine.finish_sequence("a2", 0, "stop")],  # what a matched stop string does
            12: [lambda engine: engine.abort_request("a3"), add("b", ids[4], greedy)],
        }

    steps = both(pair, script)
    last_a1 = max(n for n, outs in enumerate(steps) if any(o[0] == "a1" for o in outs))
    assert last_a1 < 8  # nothing of an aborted request comes out after the abort
    assert len(tokens_of(steps, "a0")) == 20 and len(tokens_of(steps, "b")) == 20


def test_held_and_resumed_sequences_between_steps(pair, ids):
    # DP balance parks a running sequence (hold_running) and either sends it away (release_held)
    # or keeps decoding it (resume_held: it re-enters the running set, which voids the plan).
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def script() -> Script:
        return {
            0: [add(f"h{k}", ids[k], greedy) for k in range(3)],
            6: [lambda engine: engine.handoff.hold_running("h0"), lambda engine: engine.handoff.hold_running("h1")],
            8: [lambda engine: engine.handoff.release_held("h1")],
            9: [lambda engine: engine.handoff.resume_held("h0")],
        }

    steps = both(pair, script)
    assert len(tokens_of(steps, "h0")) == 16 and len(tokens_of(steps, "h2")) == 16
    assert len(tokens_of(steps, "h1")) < 16 and not pair["on"].engine.requests_of("h1")  # it went away


def test_structured_outputs_overlap_and_match_serial(pair, ids):
    def script() -> Script:
        return {0: [
            add("json", ids[3], SamplingParams(temperature=0.0, max_tokens=30, structured_kind="json_schema",
                                               structured_spec=json.dumps(SCHEMA))),
            add("choice", ids[1], SamplingParams(temperature=0.0, max_tokens=10, structured_kind="choice",
                                                 structured_spec='["Apollo 11", "Gemini"]')),
            add("plain", ids[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
        ]}

    before = pair["on"].engine.pipeline.steps_from_plan
    steps = both(pair, script)
    tokenizer = pair["off"].tokenizer
    json.loads(tokenizer.decode(tokens_of(steps, "json")))
    assert tokenizer.decode(tokens_of(steps, "choice")) in ("Apollo 11", "Gemini")
    assert pair["on"].engine.pipeline.steps_from_plan > before  # structured rows do not stop the overlap


def test_online_arrival_preempts_offline_as_serial(pair, ids):
    # Four offline sequences fill the batch; an online one arrives while they decode.
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    before = {mode: llm.engine.stats.preemptions for mode, llm in pair.items()}

    def script() -> Script:
        return {0: [add(f"off{k}", ids[k], greedy, "offline") for k in range(4)],
                7: [add("online", ids[4], greedy)]}

    steps = both(pair, script)
    preempted = {mode: llm.engine.stats.preemptions - before[mode] for mode, llm in pair.items()}
    assert preempted["on"] == preempted["off"] > 0
    assert len(tokens_of(steps, "online")) == 16


def test_tight_page_pool_preempts_as_serial(smollm_path):
    # Pages of 4 tokens, 24 of them: four sequences cannot all grow, so some are preempted.
    page_bytes = kv_page_bytes(30, 3, 64, 4, EngineConfig().resolved_kv_dtype())  # SmolLM2-135M's KV layout
    pair = make_pair(smollm_path, kv_cache_memory=24 * page_bytes, page_size=4, max_num_batched_tokens=16)
    assert pair["on"].engine.num_pages == 24
    tokenizer = pair["off"].tokenizer
    prompts = [tokenizer.encode(t)[:12] for t in TEXTS[:4]]
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    steps = both(pair, lambda: {0: [add(f"t{k}", p, greedy) for k, p in enumerate(prompts)]})
    assert pair["on"].engine.stats.preemptions > 0
    assert all(len(tokens_of(steps, f"t{k}")) == 20 for k in range(4))
    assert pair["on"].engine.pipeline.steps_from_plan > 0


def test_speculative_decoding_falls_back_and_matches_serial(smollm_path):
    pair = make_pair(smollm_path, kv_cache_memory="32MiB", speculative_method="ngram")
    tokenizer = pair["off"].tokenizer
    text = "one two three four five six seven eight nine ten. one two three four five six seven"
    prompts = [tokenizer.encode(text), tokenizer.encode(TEXTS[0])]
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    both(pair, lambda: {0: [add(f"sp{k}", p, greedy) for k, p in enumerate(prompts)]})
    assert pair["on"].engine.load_stats()["spec_draft_tokens_total"] > 0
    assert pair["on"].engine.pipeline.steps_from_plan == 0  # drafts need the last token: serial steps


def test_beam_search_matches_serial(pair, ids):
    results = {mode: llm.beam_search([ids[0], ids[3]], beam_width=3, max_tokens=6) for mode, llm in pair.items()}
    assert [[(b.token_ids, b.cumulative_logprob) for b in r] for r in results["on"]] == \
           [[(b.token_ids, b.cumulative_logprob) for b in r] for r in results["off"]]
    assert pair["on"].engine.block_manager.num_used_pages == 0


def test_batches_under_the_minimum_stay_serial(pair, ids):
    pipeline = pair["on"].engine.pipeline
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = pipeline.steps_planning
    drive(pair["on"].engine, {0: [add("x0", ids[0], greedy)]})
    assert pipeline.steps_planning == before  # below overlap_min_batch rows
    drive(pair["on"].engine, {0: [add(f"y{k}", ids[k], greedy) for k in range(2)]})
    assert pipeline.steps_planning > before


def test_overlap_modes_and_flags():
    assert resolve_min_batch("off", "cpu", 8) is None
    assert resolve_min_batch("on", "cpu", 8) == 8
    assert resolve_min_batch("auto", "cpu", 8) is None  # measured: no gain when torch has every core
    assert resolve_min_batch("auto", "cuda", 8) == 1
    with pytest.raises(ValueError, match="overlap_schedule"):
        resolve_min_batch("sometimes", "cpu", 8)
    with pytest.raises(ValueError, match="overlap_min_batch"):
        resolve_min_batch("on", "cpu", 0)
    default = EngineConfig()
    assert resolve_min_batch(default.overlap_schedule, default.device, default.overlap_min_batch) is None
    parser = SettingsParser()
    add_engine_arguments(parser)
    defaults = engine_config_from_args(parser.parse_args([]))
    assert (defaults.overlap_schedule, defaults.overlap_min_batch) == ("auto", DEFAULT_OVERLAP_MIN_BATCH)
    config = engine_config_from_args(parser.parse_args(["--overlap-schedule", "on", "--overlap-min-batch", "4"]))
    assert (config.overlap_schedule, config.overlap_min_batch) == ("on", 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--overlap-schedule", "sometimes"])



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_overlap_matches_serial(smollm_path):
    # On a GPU, auto plans beside every step.
    serial = LLM(smollm_path, device="cuda", overlap_schedule="off", kv_cache_memory="64MiB")
    auto = LLM(smollm_path, device="cuda", overlap_schedule="auto", kv_cache_memory="64MiB")
    prompts = [serial.tokenizer.encode(t) for t in TEXTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    both({"off": serial, "on": auto}, lambda: {0: [add(f"g{k}", p, greedy) for k, p in enumerate(prompts)]})
    assert auto.engine.pipeline.steps_from_plan > 0
