"""The engine on the real SmolLM2 GGUF produces exactly transformers' greedy tokens."""

import pytest
import torch

from common.engine import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, straight through EOS (generate() would stop or mask it)."""
    out: list[int] = []
    past = None
    step_ids = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            res = model(step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            step_ids = torch.tensor([[token]])
    return out


@pytest.mark.slow
def test_64_greedy_tokens_match_transformers(smol_llm, hf_smollm):
    prompt_ids = [smol_llm.tokenizer.encode_chat(conv) for conv in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ours = smol_llm.generate(prompt_ids, params)
    for ids, out in zip(prompt_ids, ours):
        assert out.token_ids == hf_greedy(hf_smollm, ids, 64)
    smol_llm.engine.check_integrity()
