"""Embeddings (`common.engine.embedding`, `LLM.embed`) against transformers' hidden states on the
same SmolLM2 weights, fp32: the last hidden state transformers returns is after the final norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.engine.embedding import EmbeddingInputError, embed_token_lists

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "A hash table maps keys to values in constant expected time, using a hash function to pick a bucket.",
]


_HF_HIDDEN: dict[tuple[int, ...], torch.Tensor] = {}


def hf_pooled(model, ids: list[int], pooling: str) -> torch.Tensor:
    key = tuple(ids)
    hidden = _HF_HIDDEN.get(key)
    if hidden is None:  # one forward per input serves both poolings (the machine is slow)
        with torch.inference_mode():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        hidden = _HF_HIDDEN[key] = out.hidden_states[-1][0].float()
    return hidden[-1] if pooling == "last" else hidden.mean(dim=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batch_matches_transformers(smol_llm, hf_smollm, pooling):
    ids = [smol_llm.tokenizer.encode(t) for t in TEXTS]
    ours = smol_llm.embed(ids, pooling=pooling)
    assert len(ours) == len(ids)
    for got, prompt in zip(ours, ids):
        want = F.normalize(hf_pooled(hf_smollm, prompt, pooling), dim=-1)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-3
        assert abs(got.norm().item() - 1.0) < 1e-5
    smol_llm.engine.check_integrity()
    assert smol_llm.engine.block_manager.num_used_pages == 0  # no KV kept


def test_unnormalized_and_text_prompt(smol_llm, hf_smollm):
    ids = smol_llm.tokenizer.encode(TEXTS[1])
    raw = smol_llm.embed(TEXTS[1], pooling="mean", normalize=False)[0]
    want = hf_pooled(hf_smollm, ids, "mean")
    assert torch.allclose(raw, want, atol=1e-3, rtol=1e-3)


def test_long_input_runs_in_chunks(smol_llm, hf_smollm):
    # Longer than the engine's token budget (256): prefilled in chunks through its pages.
    ids = (smol_llm.tokenizer.encode(" ".join(TEXTS)) * 12)[:300]
    assert len(ids) > smol_llm.engine.config.max_num_batched_tokens
    for pooling in ("last", "mean"):
        got = smol_llm.embed([ids, ids[:5]], pooling=pooling)
        assert (got[0] - F.normalize(hf_pooled(hf_smollm, ids, pooling), dim=-1)).abs().max().item() < 1e-3
        assert (got[1] - F.normalize(hf_pooled(hf_smollm, ids[:5], pooling), dim=-1)).abs().max().item() < 1e-3
    assert smol_llm.engine.block_manager.num_used_pages == 0


def test_batching_does_not_change_results(smol_llm):
    ids = [smol_llm.tokenizer.encode(t) for t in TEXTS]
    together = torch.stack(smol_llm.embed(ids))
    alone = torch.stack([smol_llm.embed([p])[0] for p in ids])
    assert (together - alone).abs().max().item() < 1e-5


def test_bad_inputs_are_refused_before_any_work(smol_llm):
    engine = smol_llm.engine
    with pytest.raises(EmbeddingInputError, match="empty"):
        embed_token_lists(engine, [[1, 2], []])
    with pytest.raises(EmbeddingInputError, match="context window"):
        embed_token_lists(engine, [[1] * (engine.max_model_len + 1)])
    with pytest.raises(EmbeddingInputError, match="vocabulary"):
        embed_token_lists(engine, [[engine.vocab_size]])
    with pytest.raises(ValueError, match="pooling"):
        embed_token_lists(engine, [[1, 2]], pooling="cls")
    assert engine.block_manager.num_used_pages == 0


# ------------------------------------------------------------------ the worker's embedding queue


class _Pushers:
    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, address: str, msg) -> bool:
        self.sent.append(msg)
        return True


def _assign(request_id: str, ids: list[int], pooling: str = "last"):
    from common.protocol import Assign, EmbedTask, Sampling

    return Assign(request_id=request_id, prompt_ids=ids, sampling=Sampling(), priority="online", gateway_id="g",
                  tokens_addr="ipc:///tmp/none", prefill_instance="w", decode_instance="w", arrival_time=0.0,
                  embed=EmbedTask(pooling=pooling, normalize=True))


def test_worker_queue_batches_what_arrives_together(smol_llm):
    """Embedding Assigns queued before the engine thread is free run in one engine call per pooling;
    bad inputs, duplicates and aborts are answered one by one and every request is finished."""
    import asyncio
    import types

    import numpy as np

    from common.protocol import EmbeddingResult, RequestError, RequestFinished
    from services.worker.embed_queue import EmbedQueue

    ids = [smol_llm.tokenizer.encode(t) for t in TEXTS]
    calls: list[tuple[int, str]] = []
    finished: list = []
    worker = types.SimpleNamespace(instance_id="w", engine=smol_llm.engine, pushers=_Pushers())

    async def run_on_engine(fn, *args):
        calls.append((len(args[1]), args[2]))
        return fn(*args)

    async def send_backend(msg) -> None:
        finished.append(msg)

    async def scenario() -> None:
        queue = EmbedQueue(worker, run_on_engine, send_backend, lambda: None)
        for i, prompt in enumerate(ids):
            await queue.add(_assign(f"r{i}", prompt))
        await queue.add(_assign("r0", ids[0]))  # duplicate id: 409
        await queue.add(_assign("m0", ids[0], pooling="mean"))
        await queue.add(_assign("bad", [smol_llm.engine.vocab_size]))
        await queue.add(_assign("gone", ids[1]))
        assert queue.abort("gone") and "gone" not in queue
        await queue._task

    asyncio.run(scenario())
    assert sorted(calls) == [(1, "mean"), (3, "last")]
    results = {m.request_id: m for m in worker.pushers.sent if isinstance(m, EmbeddingResult)}
    errors = {m.request_id: m.code for m in worker.pushers.sent if isinstance(m, RequestError)}
    assert errors == {"r0": 409, "bad": 400}
    want = smol_llm.embed(ids)
    for i in range(3):
        got = np.frombuffer(results[f"r{i}"].embedding, dtype="<f4")
        assert results[f"r{i}"].dim == got.shape[0] and results[f"r{i}"].num_prompt_tokens == len(ids[i])
        assert np.abs(got - want[i].numpy()).max() < 1e-5
    mean = np.frombuffer(results["m0"].embedding, dtype="<f4")
    assert np.abs(mean - smol_llm.embed(ids[0], pooling="mean")[0].numpy()).max() < 1e-5
    assert sorted(m.request_id for m in finished if isinstance(m, RequestFinished)) == ["bad", "m0", "r0", "r1", "r2"]
    assert smol_llm.engine.block_manager.num_used_pages == 0


def _queue_with(engine_call, monkeypatch):
    """An EmbedQueue over a stand-in engine whose one engine call is `engine_call`."""
    import types

    from services.worker import embed_queue

    monkeypatch.setattr(embed_queue, "NO_PAGES_RETRY_S", (0.0, 0.0))
    monkeypatch.setattr(embed_queue, "embed_token_lists", engine_call)
    engine = types.SimpleNamespace(max_model_len=64, page_size=16, num_pages=8, vocab_size=100)
    worker = types.SimpleNamespace(instance_id="w", engine=engine, pushers=_Pushers())
    finished: list = []

    async def run_on_engine(fn, *args):
        return fn(*args)

    async def send_backend(msg) -> None:
        finished.append(msg)

    return embed_queue.EmbedQueue(worker, run_on_engine, send_backend, lambda: None), worker, finished


@pytest.mark.parametrize("exc, code", [(RuntimeError("boom"), 500), ("no pages", 503), (ValueError("odd"), 400)])
def test_worker_queue_answers_every_failure(monkeypatch, exc, code):
    import asyncio

    from common.engine.block_manager import NoFreePagesError
    from common.protocol import RequestError, RequestFinished

    tries = []

    def engine_call(*args):
        tries.append(args)
        raise NoFreePagesError("held by generations") if exc == "no pages" else exc

    queue, worker, finished = _queue_with(engine_call, monkeypatch)

    async def scenario() -> None:
        await queue.add(_assign("a", [1, 2, 3]))
        await queue.add(_assign("b", [4, 5]))
        await queue._task

    asyncio.run(scenario())
    errors = {m.request_id: m.code for m in worker.pushers.sent if isinstance(m, RequestError)}
    assert errors == {"a": code, "b": code}
    assert all(m.message for m in worker.pushers.sent)
    assert sorted(m.request_id for m in finished if isinstance(m, RequestFinished)) == ["a", "b"]
    assert len(tries) == (3 if exc == "no pages" else 1)  # pages: retried, then 503
