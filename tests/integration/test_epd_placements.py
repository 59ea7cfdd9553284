"""EP-D, ED-P and E-P-D end to end through the official `openai` client on the tiny Qwen2.5-VL.

Greedy outputs are identical across the three placements and equal to the single-process
engine given the same prompt and images; a repeated image is served from the encoder's cache;
the encoder pool is elastic (an encoder started beside a running server takes work); and an
encoder killed with SIGKILL while it holds a request's images costs nothing: the request
completes with the same output (encoded elsewhere, here by the prefill worker).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import openai
import pytest
import torch

from tests.integration.conftest import start_server, wait_until
from tests.unit._vl_model import sample_image

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8


def _data_url(width: int, height: int, seed: int) -> str:
    buf = io.BytesIO()
    sample_image(width, height, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Two images in one message, one of them again in a second request (the cache must hit).
IMAGES = [(56, 56, 1), (112, 84, 2)]
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                  {"type": "image_url", "image_url": {"url": _data_url(*IMAGES[0])}},
                                  {"type": "image_url", "image_url": {"url": _data_url(*IMAGES[1])}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(*IMAGES[1])}},
                                  {"type": "text", "text": "What is it?"}]}],
    [{"role": "user", "content": "no image here"}],
]


def _scheduler_when(server, predicate) -> dict:  # noqa: ANN001
    """The scheduler's figures in `/status` once `predicate` holds for them."""
    def figures() -> dict | None:
        scheduler = server.status()["scheduler"]
        return scheduler if predicate(scheduler) else None

    return wait_until(figures, 30, "the scheduler's figures in /status")


def _client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=180)


def _ask(client: openai.OpenAI, messages: list[dict]) -> str:
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].message.content


def _engine_reference(model_dir: str) -> list[str]:
    """The same conversations through one in-process engine (no services at all)."""
    from common.engine.config import EngineConfig
    from common.engine.engine import LLMEngine
    from common.engine.sampling_params import SamplingParams
    from common.image_inputs import ImageProcessor, expand_image_placeholders
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    processor = ImageProcessor.from_model_dir(model_dir)
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", kv_cache_memory="64MiB"))
    image_token_id = engine.model_config.image_token_id if hasattr(engine, "model_config") else None
    if image_token_id is None:
        image_token_id = tokenizer.hf.convert_tokens_to_ids("<|image_pad|>")
    texts = []
    for messages in CONVERSATIONS:
        content = messages[0]["content"]
        pils = [sample_image(*IMAGES[0 if p["image_url"]["url"] == _data_url(*IMAGES[0]) else 1])
                for p in content if isinstance(p, dict) and p.get("type") == "image_url"] if isinstance(content, list) else []
        templated = [{**m, "content": [{"type": "image"} if p.get("type") == "image_url" else p for p in m["content"]]}
                     if isinstance(m["content"], list) else m for m in messages]
        prompt_ids = tokenizer.encode_chat(templated, add_generation_prompt=True)
        items = processor.items(pils) if pils else None
        if items:
            prompt_ids = expand_image_placeholders(prompt_ids, items, image_token_id)
        request_id = uuid.uuid4().hex
        engine.add_request(request_id, prompt_ids, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                           images=items)
        out: list[int] = []
        while engine.has_unfinished():
            for output in engine.step():
                out += output.new_token_ids
        texts.append(tokenizer.decode(out))
    return texts


@pytest.fixture(scope="module")
def reference(tiny_vl_model_dir) -> list[str]:
    torch.manual_seed(0)
    return _engine_reference(tiny_vl_model_dir)


@pytest.mark.parametrize("placement", ["ep-d", "ed-p", "e-p-d"])
def test_greedy_outputs_are_the_same_in_every_placement(tiny_vl_model_dir, reference, placement) -> None:
    server = start_server(1, ("--model", tiny_vl_model_dir, "--epd-placement", placement, "--encoder-workers", "1"))
    try:
        if placement != "ep-d":
            wait_until(lambda: any(i["role"] == "encode" for i in server.status()["instances"]), 120,
                       "the encoder registered")
        client = _client(server)
        answers = [_ask(client, messages) for messages in CONVERSATIONS]
        assert answers == reference
        scheduler = server.status()["scheduler"]
        assert scheduler["epd_placement"] == placement
        if placement == "ep-d":
            assert scheduler["encoded_requests"] == 0 and scheduler["encoders"] == 0
        else:
            # Two image requests, three images, the repeated one served from the encoder's cache
            # (the gateway's /status is a periodic copy of the scheduler's: wait for it).
            scheduler = _scheduler_when(server, lambda s: s["encoded_requests"] >= 2)
            assert scheduler["encoded_requests"] == 2 and scheduler["encoded_images"] == 3
            assert scheduler["encoder_cache_hits"] == 1 and scheduler["encode_fallbacks"] == 0
            encoder = next(i for i in server.status()["instances"] if i["role"] == "encode")
            assert encoder["colocated_with"] == ("worker-0" if placement == "ed-p" else "")
    finally:
        server.stop()


def test_encoders_join_while_serving_and_a_killed_one_costs_no_request(tiny_vl_model_dir, reference) -> None:
    # E-P-D with no encoder at first: image requests are encoded by the prefill worker meanwhile.
    server = start_server(1, ("--model", tiny_vl_model_dir, "--epd-placement", "e-p-d", "--encoder-workers", "0"))
    extra: list[subprocess.Popen] = []

    def add_encoder(name: str, *flags: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.encoder", "--model", tiny_vl_model_dir, "--dtype", "float32",
             "--run-dir", str(server.run_dir), "--instance-id", name, "--threads", "1", *flags],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        extra.append(proc)
        wait_until(lambda: any(i["id"] == name for i in server.status()["instances"]), 120, f"{name} registered")
        return proc

    try:
        client = _client(server)
        assert _ask(client, CONVERSATIONS[1]) == reference[1]
        assert _scheduler_when(server, lambda s: s["requests"] == 0)["encoded_requests"] == 0
        # A slow encoder (each batch waits 4 s) joins: the next image request waits there.
        slow = add_encoder("enc-slow", "--batch-wait-ms", "4000")
        answers: list[str] = []
        asker = threading.Thread(target=lambda: answers.append(_ask(client, CONVERSATIONS[0])))
        asker.start()
        wait_until(lambda: server.status()["scheduler"]["encoding_requests"] == 1, 60, "the job at the encoder")
        slow.send_signal(signal.SIGKILL)
        asker.join(timeout=180)
        assert answers == [reference[0]]
        scheduler = _scheduler_when(server, lambda s: s["encode_fallbacks"] >= 1)
        assert scheduler["encode_fallbacks"] == 1 and scheduler["encoded_requests"] == 0
        # A healthy encoder joins and takes the next image request.
        add_encoder("enc-b")
        assert _ask(client, CONVERSATIONS[0]) == reference[0]
        assert _scheduler_when(server, lambda s: s["encoded_requests"] >= 1)["encoded_requests"] == 1
    finally:
        for proc in extra:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        server.stop()
