"""Speculative decoding in the engine: greedy output token-for-token that of plain decoding on every
architecture (tiny random models, fp32), in mixed batches, with seeded sampling, stops, logprobs,
penalties and across the P/D hand-off."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import FAMILIES, make_hf_model, save_hf_model

from common.engine import EngineConfig, LLMEngine, SamplingParams

PAGE = 4
MAX_TOKENS = 48
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Repetitive prompts, so that drafts exist from the first decode step.
REPEAT = [5, 6, 7, 8, 9, 10, 11, 12] * 5
RANDOM = torch.randint(3, 256, (29,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory) -> str:
    return save_hf_model(make_hf_model(request.param, seed=3), tmp_path_factory.mktemp(request.param))


def make_engine(path: str, **kw) -> LLMEngine:
    kw.setdefault("max_num_batched_tokens", 12)  # the random prompt prefills in several chunks
    return LLMEngine(EngineConfig(model=path, dtype="float32", kv_cache_memory="8MiB", page_size=PAGE, **kw))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], later: dict | None = None,
        when=lambda step: step >= 2) -> dict:
    """Outputs per request; the ``later`` requests join once ``when(step)`` holds."""
    outs: dict[str, list] = {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    pending = dict(later or {})
    for step in range(3000):
        if pending and when(step):
            for rid, (prompt, params) in pending.items():
                engine.add_request(rid, prompt, params)
            pending = {}
        if not engine.has_unfinished() and not pending:
            break
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_pages == 0
    engine.check_integrity()
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def reference(tiny) -> dict[str, list[int]]:
    outs = run(make_engine(tiny), {"rep": (REPEAT, GREEDY), "rnd": (RANDOM, GREEDY)})
    return {rid: tokens(o) for rid, o in outs.items()}


def record_batches(engine: LLMEngine) -> list:
    """Every batch the engine's scheduler plans (a plain wrapper around the real scheduler)."""
    batches = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        batches.append([(item.num_new_tokens, list(item.draft), item.samples) for item in batch.items])
        return batch

    engine.scheduler.schedule = recording
    return batches


def drafted(batches: list) -> bool:
    return any(draft for batch in batches for _, draft, _ in batch)


def mixed(batches: list) -> bool:
    """Whether some step verified drafts beside a prefill chunk that does not sample yet."""
    return any(any(d for _, d, _ in b) and any(not s for _, _, s in b) for b in batches)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_equals_plain_decoding_in_mixed_batches(tiny, reference, method):
    # No prefix cache: the second round prefills its prompts again, beside the drafts.
    engine = make_engine(tiny, speculative_method=method, num_speculative_tokens=4, ngram_min=1,
                         enable_prefix_cache=False)
    batches = record_batches(engine)
    # "rnd" arrives (and prefills in chunks) once "rep" has started speculating.
    outs = run(engine, {"rep": (REPEAT, GREEDY)}, later={"rnd": (RANDOM, GREEDY)},
               when=lambda step: drafted(batches))
    assert {rid: tokens(o) for rid, o in outs.items()} == reference
    assert all(o[-1].finish_reason == "length" and o[-1].num_output_tokens == MAX_TOKENS for o in outs.values())
    stats = engine.load_stats()
    assert stats["spec_draft_tokens_total"] > 0
    assert stats["generated_tokens_total"] == 2 * MAX_TOKENS
    # Again: the suffix method now also matches the first run's outputs (its global trie), so
    # every step of "rep2" verifies drafts while "rnd2" prefills.
    batches.clear()
    again = run(engine, {"rep2": (REPEAT, GREEDY)}, later={"rnd2": (RANDOM, GREEDY)},
                when=lambda step: drafted(batches))
    assert tokens(again["rep2"]) == reference["rep"] and tokens(again["rnd2"]) == reference["rnd"]
    if method == "suffix":
        assert mixed(batches)
        after = engine.load_stats()
        assert after["spec_accepted_tokens_total"] - stats["spec_accepted_tokens_total"] >= MAX_TOKENS // 2
        assert len(again["rep2"]) < MAX_TOKENS // 2  # several tokens per step
        assert 0.0 < after["spec_acceptance_rate"] <= 1.0 and after["spec_mean_accepted_length"] > 1.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_hf_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("llama"))


def warmed_suffix_engine(path: str, params: SamplingParams, **kw) -> LLMEngine:
    """A suffix engine whose global trie already holds this prompt's plain greedy output."""
    engine = make_engine(path, speculative_method="suffix", num_speculative_tokens=6, **kw)
    run(engine, {"warm": (REPEAT, params)})
    return engine


def test_seeded_sampling_gives_the_plain_tokens(llama):
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.01, seed=99, max_tokens=MAX_TOKENS,
                            ignore_eos=True, frequency_penalty=0.3, logprobs=2)
    want = run(make_engine(llama), {"s": (REPEAT, params)})["s"]
    engine = warmed_suffix_engine(llama, params)
    got = run(engine, {"s": (REPEAT, params)})["s"]
    assert tokens(got) == tokens(want)
    assert engine.load_stats()["spec_accepted_tokens_total"] > 0
    got_lps = [lp for o in got for lp in o.new_logprobs]
    want_lps = [lp for o in want for lp in o.new_logprobs]
    assert [lp.token_id for lp in got_lps] == tokens(want)
    for g, w in zip(got_lps, want_lps):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4) and [t for t, _ in g.top] == [t for t, _ in w.top]


def test_penalised_greedy_and_min_tokens_match(llama):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, presence_penalty=0.5, repetition_penalty=1.2,
                            min_tokens=10)
    want = tokens(run(make_engine(llama), {"p": (REPEAT, params)})["p"])
    engine = warmed_suffix_engine(llama, params)
    assert tokens(run(engine, {"p": (REPEAT, params)})["p"]) == want


def test_stop_token_and_max_tokens_inside_an_accepted_run(llama, reference_llama):
    full = reference_llama
    stop_at = next(i for i in range(20, len(full)) if full[i] not in full[:i])
    stop = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[full[stop_at]], ignore_eos=True)
    engine = warmed_suffix_engine(llama, GREEDY)
    outs = run(engine, {"stop": (REPEAT, stop)})["stop"]
    assert tokens(outs) == full[: stop_at + 1] and outs[-1].finish_reason == "stop"
    assert any(len(o.new_token_ids) > 1 for o in outs)
    short = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    outs = run(engine, {"short": (REPEAT, short)})["short"]
    assert tokens(outs) == full[:13] and outs[-1].finish_reason == "length"


@pytest.fixture(scope="module")
def reference_llama(llama) -> list[int]:
    return tokens(run(make_engine(llama), {"r": (REPEAT, GREEDY)})["r"])


def test_structured_requests_do_not_speculate(llama):
    engine = warmed_suffix_engine(llama, GREEDY)
    before = engine.load_stats()["spec_draft_tokens_total"]
    params = SamplingParams(temperature=0.0, max_tokens=8, structured_kind="regex", structured_spec="[a-z]+")
    seqs = engine.add_request("s", REPEAT, params)
    assert not engine.speculator.eligible(seqs[0])
    engine.abort_request("s")
    assert engine.load_stats()["spec_draft_tokens_total"] == before


def test_backoff_stops_drafts_that_keep_failing(llama, reference_llama):
    # Global outputs of a different request: drafts keep being proposed and rejected.
    engine = make_engine(llama, speculative_method="suffix", num_speculative_tokens=4)
    engine.speculator.proposer.finished(list(range(100, 140)) * 3)
    prompt = list(range(100, 140))
    plain = tokens(run(make_engine(llama), {"b": (prompt, GREEDY)})["b"])
    assert tokens(run(engine, {"b": (prompt, GREEDY)})["b"]) == plain
    stats = engine.load_stats()
    if stats["spec_acceptance_rate"] < 0.3:
        assert stats["spec_backoffs_total"] >= 1
        # Paused steps verify no drafts: far fewer speculative steps than decode steps.
        assert stats["spec_steps_total"] < MAX_TOKENS // 2


def test_handoff_to_a_speculating_decode_engine(llama, reference_llama):
    prefill = make_engine(llama)
    decode = warmed_suffix_engine(llama, GREEDY)
    before = decode.load_stats()["spec_accepted_tokens_total"]
    prefill.add_request("h", REPEAT, GREEDY, hold_after_prefill=True)
    while prefill.has_unfinished():
        prefill.step()
    exp = prefill.handoff.export_kv("h")
    decode.handoff.reserve_transfer(
        "h", exp.prompt_ids, exp.output_ids, GREEDY, num_tokens=exp.num_tokens, logprobs=exp.logprobs,
        num_cached_tokens=exp.num_cached_tokens, generator_state=exp.generator_state,
    )
    decode.handoff.write_kv_layers("h", 0, exp.layers(0, exp.num_layers))
    decode.handoff.commit_transfer("h")
    prefill.handoff.release_held("h")
    rest = _drain(decode)["h"]
    assert exp.output_ids + tokens(rest) == reference_llama
    assert decode.load_stats()["spec_accepted_tokens_total"] > before
    assert decode.block_manager.num_used_pages == 0
    decode.check_integrity()


def _drain(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(3000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    return outs
