"""Generative recommendation's fixed-step decoding: every request gets exactly N tokens, all from the
item vocabulary; the overlapped pipeline, the serial runs and the engine's own beam search agree."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import make_hf_model, save_hf_model

from common.engine import EngineConfig, LLMEngine, SamplingParams
from common.engine.rec import FixedStepDecoder

PAGE_BYTES = 3 * 2 * 2 * 4 * 16 * 4  # one 4-token page of the tiny models, all layers
ITEMS = list(range(64, 96))  # the "semantic ID" tokens
WIDTH, STEPS = 4, 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    path = save_hf_model(make_hf_model("llama", seed=11), tmp_path_factory.mktemp("tiny-rec"))
    return LLMEngine(EngineConfig(model=path, dtype="float32", kv_cache_memory=256 * PAGE_BYTES, page_size=4,
                                  max_num_batched_tokens=256))


def _histories(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 256, (5 + i % 4,), generator=gen).tolist() for i in range(count)]


def test_fixed_steps_overlap_on_and_off_agree_with_engine_beam_search(engine):
    prompts = _histories(5)  # odd: the two micro-batches differ in size
    runs = {
        (overlap, batches): FixedStepDecoder(engine, WIDTH, STEPS, ITEMS, overlap=overlap,
                                             micro_batches=batches).run(prompts)
        for overlap, batches in ((True, 2), (False, 2), (False, 1))
    }
    engine.check_integrity()
    assert engine.block_manager.num_used_pages == 0
    results = runs[(True, 2)]
    for run in runs.values():  # the same beams; scores agree to rounding (the batches differ)
        assert [[b.token_ids for b in r] for r in run] == [[b.token_ids for b in r] for r in results]
        assert [b.cumulative_logprob for r in run for b in r] == pytest.approx(
            [b.cumulative_logprob for r in results for b in r], abs=1e-4)
    for per_prompt in results:
        assert len(per_prompt) == WIDTH
        assert all(len(b.token_ids) == STEPS and set(b.token_ids) <= set(ITEMS) for b in per_prompt)
        assert len({tuple(b.token_ids) for b in per_prompt}) == WIDTH
    # The engine's general beam search with the same item restriction returns the same items.
    params = SamplingParams(n=WIDTH, use_beam_search=True, temperature=0.0, max_tokens=STEPS, ignore_eos=True,
                            allowed_token_ids=ITEMS)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for i, per_prompt in enumerate(results):
        ours = sorted(outputs[f"r{i}"], key=lambda o: o.index)
        assert [o.new_token_ids for o in ours] == [b.token_ids for b in per_prompt]
        assert [o.cumulative_logprob for o in ours] == pytest.approx([b.cumulative_logprob for b in per_prompt])
    engine.check_integrity()


def test_bad_settings_are_refused(engine):
    with pytest.raises(ValueError, match="allowed tokens"):
        FixedStepDecoder(engine, 4, 3, [70, 71])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        FixedStepDecoder(engine, 2, 3, [70, 10**6])
    with pytest.raises(ValueError, match="micro_batches"):
        FixedStepDecoder(engine, 2, 3, ITEMS, overlap=True, micro_batches=1)
    with pytest.raises(ValueError, match="prompt"):
        FixedStepDecoder(engine, 2, 3, ITEMS).run([[]])
