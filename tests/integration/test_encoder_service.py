"""The encoder service as a real process on real sockets.

First against the test itself in the scheduler's place (a bound backend ROUTER): it registers
with the role `encode`, heartbeats, answers encode jobs with exactly the embeddings the vision
tower gives in-process, serves a repeated image from its cache, and refuses a malformed job
with an error instead of dying. Then against the real scheduler: `/status`-style listing of the
role `encode`, and an encoder that is killed is declared dead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
import zmq

from common import bus
from common.codec import decode, encode
from common.image_inputs import ImageProcessor
from common.protocol import (
    ENCODE_ROLE,
    EncodeImage,
    EncodeRequest,
    EncodeResult,
    Heartbeat,
    Register,
    RegisterAck,
    StatusQuery,
    StatusReply,
)
from tests.unit._vl_model import sample_image

REPO = Path(__file__).resolve().parents[2]


def _start_encoder(model_dir: str, run_dir: Path, instance_id: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "services.encoder", "--model", model_dir, "--dtype", "float32", "--run-dir",
           str(run_dir), "--instance-id", instance_id, "--threads", "1", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


class _FakeSchedulerBackend:
    """The scheduler's backend ROUTER, driven by the test (real ZeroMQ, real codec)."""

    def __init__(self, run_dir: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(f"ipc://{run_dir}/backend.sock")

    def recv(self, timeout_s: float = 120.0, want: type | None = None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                identity, *frames = self.sock.recv_multipart()
                msg, tensors = decode(frames)
                if want is None or isinstance(msg, want):
                    return identity, msg, tensors
        raise AssertionError(f"nothing ({want}) from the encoder in {timeout_s} s")

    def send(self, identity: bytes, msg, *tensors: torch.Tensor) -> None:
        self.sock.send_multipart([identity, *encode(msg, *tensors)])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def processor(tiny_vl_model_dir):
    return ImageProcessor.from_model_dir(tiny_vl_model_dir)


@pytest.fixture(scope="module")
def tower(tiny_vl_model_dir):
    from common.models.registry import load_vision_tower

    return load_vision_tower(tiny_vl_model_dir, dtype=torch.float32)[0]


def _job(items, job_id: str | None = None) -> tuple[EncodeRequest, list[torch.Tensor]]:
    images = [EncodeImage(content_hash=i.content_hash, grid_thw=list(i.grid_thw), num_tokens=i.num_tokens)
              for i in items]
    return (EncodeRequest(job_id=job_id or uuid.uuid4().hex, request_id="r", images=images),
            [i.pixel_values for i in items])


def test_encoder_registers_encodes_caches_and_survives_bad_jobs(tiny_vl_model_dir, processor, tower) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="xenc-", dir="/tmp"))
    backend = _FakeSchedulerBackend(run_dir)
    proc = _start_encoder(tiny_vl_model_dir, run_dir, "enc-a")
    try:
        identity, register, _ = backend.recv(want=Register)
        assert register.role == ENCODE_ROLE and register.instance_id == "enc-a" and register.pid == proc.pid
        backend.send(identity, RegisterAck(instance_id="enc-a", accepted=True))
        _, beat, _ = backend.recv(want=Heartbeat)
        assert beat.role == ENCODE_ROLE and beat.stats["embedding_cache_entries"] == 0

        items = processor.items([sample_image(56, 56, seed=1), sample_image(112, 84, seed=2)])
        expected = tower.encode_images(torch.cat([i.pixel_values for i in items]), [i.grid_thw for i in items])
        request, frames = _job(items)
        backend.send(identity, request, *frames)
        _, result, embeddings = backend.recv(want=EncodeResult)
        assert result.job_id == request.job_id and not result.error and result.cache_hits == 0
        assert [tuple(e.shape) for e in embeddings] == [(i.num_tokens, expected[0].shape[1]) for i in items]
        for got, want in zip(embeddings, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

        # The second image again, alone: served from the cache, the same values.
        request, frames = _job(items[1:])
        backend.send(identity, request, *frames)
        _, result, again = backend.recv(want=EncodeResult)
        assert result.cache_hits == 1 and torch.equal(again[0], embeddings[1])

        # A job whose frames do not match its images: an error answer, and the encoder goes on.
        bad, frames = _job(items[:1])
        backend.send(identity, bad, frames[0][:5])
        _, result, nothing = backend.recv(want=EncodeResult)
        assert result.job_id == bad.job_id and "do not match" in result.error and not nothing
        request, frames = _job(items[:1])
        backend.send(identity, request, *frames)
        _, result, _ = backend.recv(want=EncodeResult)
        assert not result.error and result.cache_hits == 1
        _, beat, _ = backend.recv(want=Heartbeat)
        assert beat.stats["embedding_cache_hits"] == 2 and beat.stats["jobs_failed"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            backend.close()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]


def _status(run_dir: Path) -> StatusReply:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{run_dir}/frontend.sock")
        sock.send_multipart(encode(StatusQuery()))
        assert sock.poll(10_000), "no status reply"
        msg, _ = decode(sock.recv_multipart())
        sock.close()
        return msg
    finally:
        ctx.term()


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_scheduler_lists_encoders_and_notices_one_killed(tiny_vl_model_dir) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="xenc-", dir="/tmp"))
    scheduler = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--run-dir", str(run_dir),
                                  "--epd-placement", "e-p-d"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    encoders = [_start_encoder(tiny_vl_model_dir, run_dir, name) for name in ("enc-a", "enc-b")]
    try:
        def listed() -> dict:
            reply = _status(run_dir)
            found = {i["id"]: i for i in reply.instances if i["role"] == ENCODE_ROLE}
            return reply if len(found) == 2 else {}

        reply = _wait(listed, 120, "two encoders registered")
        assert reply.scheduler["pools"] == {ENCODE_ROLE: 2}
        assert reply.scheduler["epd_placement"] == "e-p-d" and reply.scheduler["encoders"] == 2
        assert reply.scheduler["workers"]["up"] == 0  # encoders are not workers
        encoders[0].kill()  # SIGKILL: no Deregister, the scheduler finds out by itself
        encoders[0].wait(timeout=10)
        reply = _wait(lambda: (r := _status(run_dir)) and [d for d in r.scheduler["dead_instances"]
                                                            if d["id"] == "enc-a"] and r, 30, "enc-a declared dead")
        assert [i["id"] for i in reply.instances] == ["enc-b"]
    finally:
        for proc in (*encoders, scheduler):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (*encoders, scheduler):
            proc.wait(timeout=30)
