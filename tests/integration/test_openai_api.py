"""The official `openai` client against the real topology (`xllm serve`: scheduler, worker, gateway).

Greedy output is compared with the offline engine on the same prompt ids; usage counts must be
exact; stop strings must not leak; logprobs have OpenAI's shapes; a client that disconnects
mid-stream frees its KV pages on the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import aiohttp
import pytest

from common.engine.sampling_params import SamplingParams

MAX_TOKENS = 12
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
PROMPT = "The three primary colors are"

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chat_ids(smol_llm) -> list[int]:
    return smol_llm.tokenizer.encode_chat(CHAT, add_generation_prompt=True)


@pytest.fixture(scope="module")
def greedy_chat(smol_llm, chat_ids):
    """The offline engine's greedy reply to CHAT (same prompt ids as the gateway's)."""
    return smol_llm.generate(chat_ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]


@pytest.fixture(scope="module")
def greedy_completion(smol_llm):
    ids = smol_llm.tokenizer.encode(PROMPT)
    return ids, smol_llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]


# --------------------------------------------------------------------------------------- tests


def test_models_lists_the_served_model(client, server, smollm_path):
    models = client.models.list().data
    assert [m.id for m in models] == [os.path.basename(smollm_path)]
    with urllib.request.urlopen(f"{server.base_url}/v1/models/{models[0].id}") as response:
        assert json.load(response)["id"] == models[0].id


def test_chat_greedy_equals_offline_engine_with_exact_usage(client, model_id, chat_ids, greedy_chat):
    response = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == model_id and response.system_fingerprint is None
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_chat.text
    assert choice.finish_reason == greedy_chat.finish_reason
    assert response.usage.prompt_tokens == len(chat_ids)
    assert response.usage.completion_tokens == len(greedy_chat.token_ids)
    assert response.usage.total_tokens == len(chat_ids) + len(greedy_chat.token_ids)


def test_offline_priority_gives_the_same_greedy_output(client, model_id, greedy_chat):
    # service_tier="flex" (OpenAI's cheaper tier) runs as offline work: same tokens, lower priority.
    for extra in ({"priority": "offline"}, {"service_tier": "flex"}):
        response = client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        assert response.choices[0].message.content == greedy_chat.text


def test_chat_stream_matches_and_reports_usage(client, model_id, chat_ids, greedy_chat):
    stream = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == greedy_chat.text
    assert sum(1 for c in content_chunks if c.choices[0].delta.content) > 1  # streamed, not one blob
    assert content_chunks[-1].choices[0].finish_reason == greedy_chat.finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(chat_ids), len(greedy_chat.token_ids))


def test_completion_greedy_stream_and_non_stream(client, model_id, greedy_completion):
    ids, greedy = greedy_completion
    response = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.choices[0].text == greedy.text
    assert response.choices[0].finish_reason == greedy.finish_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), len(greedy.token_ids))
    # token ids as the prompt give the same result
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == greedy.text
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy.text
    assert chunks[-1].choices[0].finish_reason == greedy.finish_reason


def test_n2_gives_two_choices_with_summed_usage(client, model_id, chat_ids, smol_llm):
    response = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in response.choices)
    assert response.usage.prompt_tokens == len(chat_ids)  # the prompt counts once
    assert response.usage.completion_tokens == 12  # 2 choices x 6 tokens
    # batch prompts: one choice per prompt x n, prompt-major
    batch = client.completions.create(model=model_id, prompt=["Red", "Blue"], max_tokens=3, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both choices of a prompt agree
    assert batch.choices[2].text == batch.choices[3].text
    assert batch.usage.completion_tokens == 12  # 4 choices x 3 tokens (ignore_eos)
    assert batch.usage.prompt_tokens == len(smol_llm.tokenizer.encode("Red")) + len(smol_llm.tokenizer.encode("Blue"))


def _stop_word(text: str) -> str:
    """A stop string taken from inside the greedy text (after some output, so a prefix survives)."""
    words = text.split(" ")
    assert len(words) >= 3, f"greedy text too short to pick a stop string from: {text!r}"
    return " " + words[2][:3]


def test_stop_string_cuts_without_leaking(client, model_id, greedy_chat):
    stop = _stop_word(greedy_chat.text)
    expected = greedy_chat.text[: greedy_chat.text.index(stop)]
    response = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop, "zzzz"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < len(greedy_chat.token_ids)
    stream = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True)
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream if c.choices]
    assert "".join(p for p, _ in pieces) == expected
    assert pieces[-1][1] == "stop"
    assert all(stop not in p for p, _ in pieces)
    # n=2 greedy: both choices stop at the same place; the request ends once both are done
    both = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stop=stop, n=2)
    assert [(c.message.content, c.finish_reason) for c in both.choices] == [(expected, "stop")] * 2


def test_chat_logprobs_shape(client, model_id, greedy_chat):
    response = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0.0
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_completion_logprobs_shape(client, model_id):
    response = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.text_offset[0] == 0
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == response.choices[0].text
    assert [lp.text_offset[i + 1] - lp.text_offset[i] for i in range(3)] == [len(t) for t in lp.tokens[:3]]


def _worker(server) -> dict:
    (instance,) = server.status()["instances"]
    return instance


def _wait_pages_freed(server, what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        instance = _worker(server)
        if instance["running"] == 0 and instance["inflight"] == 0 and instance["stats"]["used_pages"] == 0:
            return
        assert time.monotonic() < deadline, f"pages not freed after {what}: {instance}"
        time.sleep(0.25)


def _aborted(server) -> float:
    with urllib.request.urlopen(f"{server.base_url}/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith('xllm_requests_finished_total{finish_reason="abort"}'):
                return float(line.split()[-1])
    return 0.0


def test_client_that_leaves_frees_the_workers_pages(server, model_id):
    aborted = _aborted(server)
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def read_a_bit_then_leave() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
                assert response.status == 200
                seen = 0
                async for line in response.content:
                    seen += line.startswith(b"data: ")
                    if seen == 3:
                        return seen
        return seen

    assert asyncio.run(read_a_bit_then_leave()) == 3
    _wait_pages_freed(server, "a streaming client left")
    assert _aborted(server) == aborted + 1  # ended by the abort, not by running out of tokens

    async def wait_then_give_up() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session:
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(f"{server.base_url}/v1/completions", json={**body, "stream": False}):
                    pass

    asyncio.run(wait_then_give_up())
    _wait_pages_freed(server, "a non-streaming client left")
    assert _aborted(server) == aborted + 2


def test_tokenize_detokenize_health_metrics(server, model_id, chat_ids):
    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.load(response)

    tokenized = post("/tokenize", {"model": model_id, "messages": CHAT})
    assert tokenized["tokens"] == chat_ids and tokenized["count"] == len(chat_ids)
    assert tokenized["max_model_len"] > len(chat_ids)
    text_ids = post("/tokenize", {"prompt": PROMPT})["tokens"]
    assert post("/detokenize", {"tokens": text_ids})["prompt"] == PROMPT
    with urllib.request.urlopen(f"{server.base_url}/health") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{server.base_url}/metrics") as response:
        metrics = response.read().decode()
    for name in ("xllm_time_to_first_token_seconds_bucket", "xllm_time_per_output_token_seconds_bucket",
                 "xllm_e2e_request_latency_seconds_count", "xllm_num_requests_running",
                 "xllm_num_requests_waiting", "xllm_prompt_tokens_total", "xllm_generation_tokens_total",
                 'xllm_requests_finished_total{finish_reason="stop"}', 'xllm_http_responses_total{status="200"}',
                 f'xllm_worker_kv_cache_usage_ratio{{instance="{_worker(server)["id"]}"}}',
                 f'xllm_worker_prefix_cache_hit_rate{{instance="{_worker(server)["id"]}"}}'):
        assert name in metrics, name
