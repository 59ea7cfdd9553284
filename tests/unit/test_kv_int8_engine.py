"""The engine over an int8 KV cache: hand-off and store payloads carry the inline scales, the
prefix namespace keeps int8 pages apart, and greedy output stays close to fp32."""

from __future__ import annotations

import pytest
import torch
from test_engine_handoff import PAGE, PROMPTS, drain, prompt, tiny_path, tokens  # noqa: F401 (tiny_path: a fixture)

from common.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from common.engine.block_manager import prefix_hashes
from kernels.kv_quant import dequantize_kv_rows

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# One int8 page across all layers: 3 layers x K/V x 2 kv heads x 4 tokens x (16 values + 4 scale bytes).
INT8_PAGE_BYTES = 3 * 2 * 2 * PAGE * (16 + 4)


def make_int8_engine(path: str, pages: int = 64, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=path, dtype="float32", kv_dtype="int8", kv_cache_memory=pages * INT8_PAGE_BYTES, page_size=PAGE,
        max_num_batched_tokens=8, **kw,
    ))


@pytest.fixture(scope="module")
def int8_reference(tiny_path) -> list[list[int]]:
    engine = make_int8_engine(tiny_path)
    assert engine.num_pages == 64 and engine.kv_dtype == torch.int8
    refs = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", p, GREEDY)
        refs.append(tokens(drain(engine)[f"ref{i}"]))
    return refs


def test_int8_pool_layout_and_namespace(tiny_path):
    engine = make_int8_engine(tiny_path, pages=8)
    assert engine.kv_caches[0].shape == (2, 2, 8, PAGE, 20) and engine.kv_caches[0].dtype == torch.int8
    assert engine.kv_page_shape == (2, 2, PAGE, 20)
    fp32 = LLMEngine(EngineConfig(model=tiny_path, dtype="float32", kv_cache_memory="64KiB", page_size=PAGE))
    # Prefix hashes of int8 pages never match fp32 pages of the same tokens (P/D peers, the store).
    assert "int8" in engine.kv_namespace and engine.kv_namespace != fp32.kv_namespace
    assert prefix_hashes(PROMPTS[0], PAGE, engine.kv_namespace) != prefix_hashes(PROMPTS[0], PAGE, fp32.kv_namespace)
    with pytest.raises(ValueError, match="KV cache dtype"):
        EngineConfig(model=tiny_path, kv_dtype="int4").resolved_kv_dtype()


def test_int8_handoff_gives_the_same_tokens_as_one_int8_engine(tiny_path, int8_reference):
    a, b = make_int8_engine(tiny_path), make_int8_engine(tiny_path)
    for i, p in enumerate(PROMPTS):
        a.add_request(f"r{i}", p, GREEDY, hold_after_prefill=True)
    drain(a)
    exp = a.handoff.export_kv("r0")
    block = exp.layer(0)
    assert block.dtype == torch.int8 and block.shape == (2, 2, len(exp.page_ids), PAGE, 20)
    # The scales travel inside the rows: the block dequantises to the prefill's keys.
    assert dequantize_kv_rows(block).abs().max() > 0
    moved = {}
    for i in range(len(PROMPTS)):
        moved[f"r{i}"] = _hand_off_int8(a, b, f"r{i}")
        a.handoff.release_held(f"r{i}")
    rest = drain(b)
    for i in range(len(PROMPTS)):
        assert moved[f"r{i}"] + tokens(rest[f"r{i}"]) == int8_reference[i]
    a.check_integrity()
    b.check_integrity()


def _hand_off_int8(a: LLMEngine, b: LLMEngine, rid: str) -> list[int]:
    exp = a.handoff.export_kv(rid)
    b.handoff.reserve_transfer(rid, exp.prompt_ids, exp.output_ids, GREEDY, num_tokens=exp.num_tokens,
                               logprobs=exp.logprobs, num_cached_tokens=exp.num_cached_tokens)
    b.handoff.write_kv_layers(rid, 0, exp.layers(0, 1))
    b.handoff.write_kv_layers(rid, 1, exp.layers(1, exp.num_layers))
    b.handoff.commit_transfer(rid)
    return exp.output_ids


def test_float_blocks_are_refused_by_an_int8_pool(tiny_path):
    b = make_int8_engine(tiny_path)
    b.handoff.reserve_transfer("x", PROMPTS[2], [5], GREEDY, num_tokens=len(PROMPTS[2]))
    n = -(-len(PROMPTS[2]) // PAGE)
    with pytest.raises(ValueError):
        b.handoff.write_kv_layers("x", 0, [torch.zeros(2, 2, n, PAGE, 16)])
    with pytest.raises(ValueError, match="dtype"):  # the right shape, but floats: never cast into int8
        b.handoff.write_kv_layers("x", 0, [torch.zeros(2, 2, n, PAGE, 20)])
    b.handoff.cancel_transfer("x")
    assert b.block_manager.num_used_pages == 0


def test_int8_store_payloads_reload_into_a_fresh_engine(tiny_path):
    """Offloaded int8 pages (values and scales, one flat payload each) give prefix hits and the
    same tokens when reloaded."""
    p1, p2 = prompt(21, 20), prompt(22, 44)
    engine = make_int8_engine(tiny_path, pages=12)
    offloaded: dict[bytes, torch.Tensor] = {}
    engine.store_hooks.set_offload_hook(lambda hs, ps: offloaded.update({h: p.clone() for h, p in zip(hs, ps)}))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("p1", p1, params)
    first = tokens(drain(engine)["p1"])
    engine.add_request("p2", p2, params)
    drain(engine)
    hashes = engine.store_hooks.prefix_hashes(p1)
    assert set(hashes) <= set(offloaded)
    assert all(offloaded[h].dtype == torch.uint8 and offloaded[h].numel() == INT8_PAGE_BYTES for h in hashes)
    fresh = make_int8_engine(tiny_path, pages=12)
    assert fresh.store_hooks.insert_cached_pages(p1, 0, [offloaded[h] for h in hashes]) == 5
    fresh.add_request("again", p1, params)
    outs = drain(fresh)["again"]
    assert outs[0].num_cached_tokens == 16 and tokens(outs) == first
    fresh.check_integrity()


def test_int8_kv_greedy_stays_close_to_fp32(smollm_path, smol_llm):
    """The default model with int8 KV: teacher-forced logits close to the fp32 cache's (top-1
    agreement, small KL), and greedy output mostly the same (not equal: int8 rounds)."""
    text = ("The printing press changed how ideas spread. Books became cheaper, more people learned to "
            "read, and scientists could share their results with colleagues across Europe.")
    ids = smol_llm.tokenizer.encode(text)
    model = smol_llm.engine.model
    ref = model.score(ids, chunk_size=16)
    got = model.score(ids, chunk_size=16, kv_dtype=torch.int8)
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert top1 >= 0.9 and kl < 0.05, (top1, kl)

    llm8 = LLM(smollm_path, dtype="float32", kv_dtype="int8", kv_cache_memory="48MiB", max_num_batched_tokens=256)
    prompts = [smol_llm.tokenizer.encode(t) for t in ("The quick brown fox", "def fibonacci(n):\n    ",
                                                       "Paris is the capital of France. Berlin is the capital of")]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in smol_llm.generate(prompts, params)]
    have = [o.token_ids for o in llm8.generate(prompts, params)]
    agree = sum(sum(1 for _ in _common_prefix(w, h)) for w, h in zip(want, have)) / sum(len(w) for w in want)
    assert agree >= 0.5, (want, have)


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x
