"""`POST /v1/embeddings` through the real services (`xllm serve`: gateway, scheduler, worker) with
the official `openai` client: the vectors equal the offline engine's (`LLM.embed`, same fp32
weights), in float and base64, for text, batch and token-id inputs; bad input gets a clear 4xx.

The server runs with `--embedding-pooling mean` (not the default `last`), so the flag's way from
`xllm serve` through the gateway and the bus to the worker is checked too; both poolings are
checked against transformers in tests/unit/test_embedding.py."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "Hello!"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=1, extra_args=("--embedding-pooling", "mean"))


@pytest.fixture(scope="module")
def offline(smol_llm) -> dict[str, np.ndarray]:
    """The offline engine's embeddings (mean pooling, as the server's; L2-normalised)."""
    return {text: vec.numpy() for text, vec in zip(TEXTS, smol_llm.embed(TEXTS, pooling="mean"))}


def close(a, b, tol: float = 1e-4) -> bool:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))) < tol


def test_float_matches_offline_engine(client, model_id, offline, smol_llm):
    res = client.embeddings.create(model=model_id, input=TEXTS[0], encoding_format="float")
    assert res.object == "list" and res.model == model_id and len(res.data) == 1
    item = res.data[0]
    assert item.object == "embedding" and item.index == 0
    assert len(item.embedding) == smol_llm.engine.model_config.hidden_size
    assert close(item.embedding, offline[TEXTS[0]])
    assert abs(np.linalg.norm(item.embedding) - 1.0) < 1e-4
    n = len(smol_llm.tokenizer.encode(TEXTS[0]))
    assert res.usage.prompt_tokens == n and res.usage.total_tokens == n


def test_base64_is_little_endian_float32(client, model_id, offline):
    res = client.embeddings.create(model=model_id, input=TEXTS[1], encoding_format="base64")
    raw = res.data[0].embedding
    assert isinstance(raw, str)
    assert close(np.frombuffer(base64.b64decode(raw), dtype="<f4"), offline[TEXTS[1]])
    # The client's default asks for base64 and decodes it itself.
    default = client.embeddings.create(model=model_id, input=TEXTS[1])
    assert close(default.data[0].embedding, offline[TEXTS[1]])


def test_batch_keeps_order(client, model_id, offline):
    res = client.embeddings.create(model=model_id, input=TEXTS, encoding_format="float")
    assert [d.index for d in res.data] == [0, 1, 2]
    for text, item in zip(TEXTS, res.data):
        assert close(item.embedding, offline[text])


def test_token_id_inputs(client, model_id, offline, smol_llm):
    ids = [smol_llm.tokenizer.encode(t) for t in TEXTS[:2]]
    one = client.embeddings.create(model=model_id, input=ids[0], encoding_format="float")
    assert close(one.data[0].embedding, offline[TEXTS[0]])
    many = client.embeddings.create(model=model_id, input=ids, encoding_format="float")
    assert len(many.data) == 2 and close(many.data[1].embedding, offline[TEXTS[1]])
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_dimensions_equal_to_the_model_size_is_accepted(client, model_id, smol_llm):
    width = smol_llm.engine.model_config.hidden_size
    res = client.embeddings.create(model=model_id, input="hi", dimensions=width, encoding_format="float")
    assert len(res.data[0].embedding) == width
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=model_id, input="hi", dimensions=width // 2)
    assert err.value.body["param"] == "dimensions"


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["a", [1, 2]]}, "input"),
    ({"input": 5}, "input"),
    ({"input": [1, 2, 10**9]}, "input"),  # outside the vocabulary
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({}, "input"),
])
def test_bad_bodies_get_400(server, model_id, body, param):
    status, reply = server.request("POST", "/v1/embeddings", {"model": model_id, **body})
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]


def test_over_long_input_is_refused(server, model_id):
    status, reply = server.request("POST", "/v1/embeddings", {"model": model_id, "input": [1] * 100_000})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")


def test_no_pages_are_kept(server, client, model_id):
    client.embeddings.create(model=model_id, input=TEXTS * 4)

    def idle() -> bool:
        return all(inst["stats"]["used_pages"] == 0 and inst["running"] == 0 for inst in server.instances().values())

    server.wait_until(idle, 20, "the worker to hold no pages")
    # Generation still works beside embeddings.
    assert server.complete("Hello", max_tokens=2)["choices"][0]["finish_reason"] == "length"
