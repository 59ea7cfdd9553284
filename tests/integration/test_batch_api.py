"""The OpenAI Batch API end to end: the official `openai` client's files and batches calls against
`xllm serve`, results equal to the same requests sent online, cancel, expiry, a malformed file, a
file over the limit, and a gateway SIGKILLed mid-batch that resumes without running a line twice."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import openai
import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello.", "Count to three.", "What is the sun?",
             "Name a fruit."]


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(1, ("--max-batch-file-bytes", "200000"))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def _line(model: str, custom_id: str, question: str, max_tokens: int = 8) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": question}],
                     "max_tokens": max_tokens, "temperature": 0}}


def _upload(client: openai.OpenAI, lines: list) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return client.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float = 180.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s} s")


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_batch_matches_online_and_reports_bad_lines(server, client):
    model = server.model_id()
    good = [_line(model, f"q{i}", q) for i, q in enumerate(QUESTIONS[:4])]
    over_long = _line(model, "too-long", "word " * 9000)
    unknown_model = _line("no-such-model", "bad-model", "Hi")
    surrogate = json.dumps(_line(model, "surrogate", "a")).replace('"content": "a"', '"content": "a\\ud800b"')
    file_id = _upload(client, [*good, "{not json", unknown_model, over_long, surrogate])
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status in ("validating", "in_progress")
    batch = _wait(client, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 4, 4)
    assert batch.metadata == {"job": "test"}

    output = {row["custom_id"]: row for row in _jsonl(client, batch.output_file_id)}
    assert sorted(output) == ["q0", "q1", "q2", "q3"]
    for line in good:
        online = client.chat.completions.create(**line["body"])
        row = output[line["custom_id"]]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert row["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content

    errors = {row["custom_id"]: row for row in _jsonl(client, batch.error_file_id)}
    assert set(errors) == {"line-5", "bad-model", "too-long", "surrogate"}
    assert "surrogate" in errors["surrogate"]["error"]["message"]
    assert errors["line-5"]["error"]["code"] == "invalid_json_line"
    assert "no-such-model" in errors["bad-model"]["error"]["message"]
    assert errors["too-long"]["error"]["code"] == "context_length_exceeded"

    listed = client.batches.list(limit=10)
    assert batch.id in [b.id for b in listed.data]
    status = server.status()["batches"]
    assert status["offline_tokens_total"] > 0 and status["throttle"]["max_slots"] >= 1
    code, metrics = server.request("GET", "/metrics")
    assert code == 200
    tokens = [line for line in metrics.splitlines() if line.startswith("xllm_offline_generation_tokens_total ")]
    assert tokens and float(tokens[0].split()[1]) > 0


def test_malformed_and_oversized_files(server, client):
    batch = client.batches.create(input_file_id=_upload(client, ["", "   "]), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = _wait(client, batch.id, {"failed"})
    assert batch.errors.data[0].code == "empty_file"
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 300_000)), purpose="batch")
    assert exc.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=_upload(client, ["{}"]), endpoint="/v1/embeddings",
                              completion_window="24h")


def test_cancel(server, client):
    model = server.model_id()
    lines = [_line(model, f"c{i}", QUESTIONS[i % len(QUESTIONS)], max_tokens=48) for i in range(40)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    _wait(client, batch.id, {"in_progress"})
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, {"cancelled"})
    assert batch.request_counts.completed < 40
    ids = [row["custom_id"] for row in _jsonl(client, batch.output_file_id)]
    assert len(ids) == len(set(ids)) == batch.request_counts.completed


def test_expiry(server, client):
    model = server.model_id()
    lines = [_line(model, f"e{i}", QUESTIONS[i % len(QUESTIONS)], max_tokens=48) for i in range(40)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="3s")
    batch = _wait(client, batch.id, {"expired"})
    done = [row["custom_id"] for row in _jsonl(client, batch.output_file_id)]
    expired = [row for row in _jsonl(client, batch.error_file_id)]
    assert all(row["error"]["code"] == "batch_expired" for row in expired)
    assert sorted(done + [row["custom_id"] for row in expired]) == sorted(f"e{i}" for i in range(40))


def test_gateway_killed_mid_batch_resumes_exactly_once(server, client):
    model = server.model_id()
    lines = [_line(model, f"k{i}", QUESTIONS[i % len(QUESTIONS)], max_tokens=24) for i in range(24)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    server.wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3, 120,
                      "a few lines to finish")
    os.kill(server.child_pid("services.gateway"), signal.SIGKILL)

    def back() -> bool:
        try:
            return client.batches.retrieve(batch.id) is not None
        except openai.APIConnectionError:
            return False

    server.wait_until(back, 90, "the gateway to come back")
    batch = _wait(client, batch.id, {"completed"}, timeout_s=240)
    rows = _jsonl(client, batch.output_file_id)
    ids = [row["custom_id"] for row in rows]
    assert sorted(ids) == sorted(f"k{i}" for i in range(24))  # every line, exactly once
    assert batch.request_counts.completed == 24 and batch.request_counts.failed == 0


def test_cli_submit_wait_and_results(server, tmp_path):
    import subprocess
    import sys

    model = server.model_id()
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(_line(model, f"cli{i}", q)) for i, q in enumerate(QUESTIONS[:3])) + "\n")
    xllm = [sys.executable, "-m", "xllm.cli", "batch"]
    submit = subprocess.run([*xllm, "submit", str(path), "--url", server.base_url, "--wait"],
                            capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stderr
    batch_id = submit.stdout.splitlines()[0]
    assert json.loads(submit.stdout.splitlines()[-1]) == {"total": 3, "completed": 3, "failed": 0,
                                                         "status": "completed"}
    out = tmp_path / "out.jsonl"
    results = subprocess.run([*xllm, "results", batch_id, "--url", server.base_url, "-o", str(out)],
                             capture_output=True, text=True, timeout=60)
    assert results.returncode == 0, results.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["cli0", "cli1", "cli2"]
    missing = subprocess.run([*xllm, "status", "batch_nope", "--url", server.base_url],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "404" in missing.stderr
