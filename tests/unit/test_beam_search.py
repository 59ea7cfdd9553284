"""Beam search in the engine: the beams equal transformers' `generate(num_beams=...)` in fp32 on tiny
random models, pages are shared by reference count (copy-on-write of the last page) and nothing
leaks, and the offline `LLM.beam_search` returns each prompt's beams best first."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _model_helpers import make_hf_model, save_hf_model

from common.engine import EngineConfig, LLMEngine, SamplingParams
from common.engine.block_manager import BlockManager, NoFreePagesError
from common.engine.sampling_params import InvalidSamplingParameter

PAGE = 4
# One page across all layers of the tiny models: 3 layers x K/V x 2 kv heads x 4 tokens x head_dim 16 x fp32.
PAGE_BYTES = 3 * 2 * 2 * PAGE * 16 * 4

# (beam width, max new tokens, length_penalty, early_stopping)
SETTINGS = [(4, 12, 1.0, False), (3, 10, 0.5, True), (4, 12, 2.0, "never"), (2, 9, -1.0, False)]


def _prompts(count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (4 + 3 * i,), generator=gen).tolist() for i in range(count)]


def hf_beams(model, prompt: list[int], width: int, max_new: int, length_penalty: float, early_stopping,
             eos: int, allowed: list[int] | None = None) -> list[list[int]]:
    """transformers' beams, best first, each cut after its EOS (generate pads with EOS after it)."""
    kwargs = {}
    if allowed is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), num_beams=width,
            do_sample=False, max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=width, eos_token_id=eos, pad_token_id=eos, **kwargs,
        )
    beams = []
    for row in out.tolist():
        tokens = row[len(prompt):]
        beams.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return beams


def make_engine(path: str, pages: int = 256, batch_tokens: int = 64, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", kv_cache_memory=pages * PAGE_BYTES, page_size=PAGE,
                                  max_num_batched_tokens=batch_tokens, **kw))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Add every request, step until done; each request's outputs by choice index, checking the pool."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list] = {rid: [] for rid in requests}
    for _ in range(5000):  # a cap, so a scheduling bug fails the test instead of hanging it
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs[out.request_id].append(out)
        engine.check_integrity()
    assert not engine.has_unfinished() and engine.num_requests == 0
    assert engine.block_manager.num_used_pages == 0
    return {rid: sorted(outs, key=lambda o: o.index) for rid, outs in outputs.items()}


def beam_params(width: int, max_new: int, length_penalty: float = 1.0, early_stopping=False, **kw) -> SamplingParams:
    return SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=max_new,
                          length_penalty=length_penalty, early_stopping=early_stopping, **kw)


def _make_tiny(family: str, tmp_path_factory) -> tuple:
    """A tiny random model whose EOS is a token its beams often pick, so beams end early too."""
    hf = make_hf_model(family, seed=5)
    counts: Counter[int] = Counter()
    for prompt in _prompts(len(SETTINGS), seed=1):  # the prompts test_beams_equal_transformers uses
        for beam in hf_beams(hf, prompt, 4, 8, 1.0, False, eos=0):
            counts.update(beam[2:])
    eos = counts.most_common(1)[0][0]
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    path = save_hf_model(hf, tmp_path_factory.mktemp(f"tiny-{family}"))
    return hf, path, eos


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    return _make_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _make_tiny("llama", tmp_path_factory)


def test_beams_equal_transformers(tiny):
    hf, path, eos = tiny
    engine = make_engine(path)
    prompts = _prompts(len(SETTINGS), seed=1)
    requests = {f"r{i}": (prompt, beam_params(*setting)) for i, (prompt, setting) in enumerate(zip(prompts, SETTINGS))}
    outputs = run(engine, requests)  # all four in one batch
    ended_by_eos = 0
    for i, (prompt, setting) in enumerate(zip(prompts, SETTINGS)):
        expected = hf_beams(hf, prompt, *setting, eos=eos)
        ours = [out.new_token_ids for out in outputs[f"r{i}"]]
        assert ours[0] == expected[0], f"best beam differs for setting {setting}"
        assert ours == expected, f"beams differ for setting {setting}"
        ended_by_eos += sum(out.finish_reason == "stop" for out in outputs[f"r{i}"])
    assert ended_by_eos > 0, "no beam ended with EOS: the EOS paths went untested"
    assert engine.beams.num_forks > 0 and engine.beams.num_page_copies > 0


def test_allowed_token_ids_equal_transformers_constrained(tiny):
    hf, path, eos = tiny
    allowed = list(range(40, 72))  # an "item vocabulary" without the EOS
    engine = make_engine(path)
    prompts = _prompts(2, seed=7)
    params = beam_params(4, 6, ignore_eos=True, allowed_token_ids=allowed)
    outputs = run(engine, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        ours = [out.new_token_ids for out in outputs[f"r{i}"]]
        assert ours == hf_beams(hf, prompt, 4, 6, 1.0, False, eos=eos, allowed=allowed)
        assert all(len(beam) == 6 and set(beam) <= set(allowed) for beam in ours)


def test_small_pool_preempts_and_recomputes_to_the_same_beams(tiny_llama):
    _, path, _ = tiny_llama
    prompts = _prompts(3, seed=3)
    requests = {f"r{i}": (p, beam_params(4, 12)) for i, p in enumerate(prompts)}
    roomy = run(make_engine(path), requests)
    # 20 pages for three requests of 4 beams, 8-token steps: chunked prefill, preempted beams, forks
    # without a page to copy into, parked beams' pages released.
    tight = make_engine(path, pages=20, batch_tokens=8)
    cramped = run(tight, requests)
    for rid in requests:
        assert [o.new_token_ids for o in cramped[rid]] == [o.new_token_ids for o in roomy[rid]]
    assert tight.stats.preemptions > 0


def test_abort_mid_search_frees_every_page(tiny_llama):
    _, path, _ = tiny_llama
    engine = make_engine(path)
    engine.add_request("a", _prompts(1, seed=4)[0], beam_params(4, 12))
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_used_pages > 0
    assert engine.abort_request("a")
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished()
    engine.check_integrity()


def test_fork_shares_full_pages_and_copies_the_partial_one():
    bm = BlockManager(num_pages=8, page_size=4, namespace="t")
    tokens = list(range(10))
    bm.admit("p", tokens)
    assert bm.ensure_capacity("p", 10)
    bm.commit("p", tokens, 10)  # pages 0, 1 full, page 2 holds 2 of 4 slots
    parent = bm.page_table("p")
    source, destination = bm.fork("p", "c")
    child = bm.page_table("c")
    assert child[:2] == parent[:2] and source == parent[2] and destination == child[2] != parent[2]
    assert bm.fork("p", "d") is not None and bm.num_used_pages == 5
    bm.check_integrity()
    bm.free("p")
    bm.check_integrity()
    assert bm.num_used_pages == 4  # the shared pages live on in the children
    bm.free("c")
    bm.free("d")
    assert bm.num_used_pages == 0
    bm.check_integrity()
    # Page-aligned: nothing to copy. Pool dry with a partial page: refused, nothing changed.
    bm.admit("q", list(range(8)))
    assert bm.ensure_capacity("q", 8)
    bm.commit("q", list(range(8)), 8)
    assert bm.fork("q", "q2") is None and bm.page_table("q2") == bm.page_table("q")
    full = BlockManager(num_pages=1, page_size=4)
    full.admit("x", [1, 2])
    assert full.ensure_capacity("x", 2)
    full.commit("x", [1, 2], 2)
    with pytest.raises(NoFreePagesError):
        full.fork("x", "y")
    assert "y" not in full
    full.check_integrity()


@pytest.mark.parametrize("changes, param", [
    (dict(temperature=0.7), "temperature"),
    (dict(top_p=0.9), "top_p"),
    (dict(stop=["x"]), "stop"),
    (dict(logprobs=2), "logprobs"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(allowed_token_ids=[5, 6]), "allowed_token_ids"),
])
def test_invalid_beam_parameters_are_refused(changes, param):
    values = {"n": 4, "use_beam_search": True, "temperature": 0.0, **changes}
    with pytest.raises(InvalidSamplingParameter) as info:
        SamplingParams(**values).validate()
    assert info.value.param == param


def test_sampling_honours_allowed_token_ids(tiny_llama):
    _, path, _ = tiny_llama
    engine = make_engine(path)
    allowed = [7, 11, 13, 200]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed)
    outputs = run(engine, {"s": ([5, 6, 7], params), "g": ([9, 8], greedy)})
    for rid in ("s", "g"):
        tokens = [t for out in outputs[rid] for t in out.new_token_ids]
        assert len(tokens) == 20 and set(tokens) <= set(allowed)


def test_llm_beam_search_returns_beams_best_first(smol_llm):
    prompts = ["The capital of France is", smol_llm.tokenizer.encode("Once upon a time")]
    results = smol_llm.beam_search(prompts, beam_width=3, max_tokens=6, length_penalty=1.0)
    assert len(results) == 2
    for result in results:
        assert len(result) == 3
        scores = [b.cumulative_logprob / len(b.token_ids) for b in result]
        assert scores == sorted(scores, reverse=True)
        for beam in result:
            assert 1 <= len(beam.token_ids) <= 6 and beam.cumulative_logprob < 0
            assert beam.text == smol_llm.tokenizer.decode(beam.token_ids, skip_special_tokens=True)
        assert len({tuple(b.token_ids) for b in result}) == 3
    assert results[0].prompt == prompts[0] and results[1].prompt_token_ids == prompts[1]
    smol_llm.engine.check_integrity()
    assert smol_llm.engine.block_manager.num_used_pages == 0
