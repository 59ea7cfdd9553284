"""`xllm serve --model DIR` on a tiny Qwen3-MoE checkpoint saved by transformers, with simulated
EP ranks and EPLB: completions through the openai client, the expert load in each instance's
`/status` stats and in `/metrics`, and greedy tokens equal to transformers'."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
import torch
import transformers

from common.default_model import default_model_path
from common.tokenizer import _load_gguf_hf_tokenizer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A random Qwen3-MoE with SmolLM2's tokenizer (its vocabulary size), saved by transformers."""
    path = tmp_path_factory.mktemp("qwen3moe")
    tokenizer = _load_gguf_hf_tokenizer(default_model_path())
    tokenizer.save_pretrained(str(path))
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return str(path), model, tokenizer


@pytest.fixture(scope="module")
def server(moe_dir, xllm_server_factory):
    return xllm_server_factory(1, ("--model", moe_dir[0], "--ep-ranks", "2", "--eplb-redundant-experts", "2",
                                   "--eplb-interval-steps", "4"))


def test_moe_completions_status_and_metrics(server, moe_dir):
    _, hf, tokenizer = moe_dir
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model_id = server.model_id()
    prompt = "The quick brown fox"
    out = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0.0)
    ids = tokenizer(prompt)["input_ids"]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert out.choices[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    for _ in range(3):
        client.completions.create(model=model_id, prompt="Hello there, how are", max_tokens=6, temperature=0.0)

    deadline = time.monotonic() + 20
    while True:
        (instance,) = server.instances().values()
        load = instance["stats"].get("expert_load")
        if load and load["rebalances"] >= 1:
            break
        assert time.monotonic() < deadline, f"no expert load with a re-placement in /status: {instance['stats']}"
        time.sleep(0.5)
    assert load["num_moe_layers"] == 2 and len(load["tokens_per_expert"][0]) == 8
    assert sum(load["tokens_per_expert"][0]) > 0 and len(load["rank_tokens"]) == 2
    assert "simulated" in load["note"]

    with urllib.request.urlopen(f"{server.base_url}/metrics") as response:
        text = response.read().decode()
    assert f'xllm_moe_expert_tokens{{expert="0",instance="{instance["id"]}"}}' in text
    assert "xllm_moe_rank_load_imbalance{" in text and "xllm_moe_eplb_rebalances{" in text
