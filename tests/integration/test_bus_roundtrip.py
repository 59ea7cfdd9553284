"""Scheduler + one worker as real processes, driven over the bus the way a gateway does.

A test client plays the gateway: DEALER to the scheduler's frontend, PULL on its own tokens
socket. Checks that greedy tokens equal the offline engine's, that bad input and malformed bus
messages are answered or dropped without harm, that an abort frees the worker's pages, and that
a dead worker's requests fail with 503 within the heartbeat timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from common.codec import decode, encode
from common.engine.sampling_params import SamplingParams
from common.protocol import (
    Abort,
    FinishChoice,
    GatewayHello,
    Heartbeat,
    KvTransferAck,
    KvTransferChunk,
    Message,
    RequestError,
    StatusQuery,
    StatusReply,
    Submit,
    TokenDelta,
)
from common.service_config import ServiceAddresses

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 2150, 30]  # token ids; the text does not matter here
STARTUP_TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(300)


class BusClient:
    """A minimal synchronous gateway: submit over the frontend, read results from the tokens PULL."""

    def __init__(self, addresses: ServiceAddresses) -> None:
        self.ctx = zmq.Context()
        self.gateway_id = f"test-{uuid.uuid4().hex[:6]}"
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(addresses.frontend)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.tokens_addr = addresses.tokens_addr(self.gateway_id)
        self.pull.bind(self.tokens_addr)
        self.send(GatewayHello(gateway_id=self.gateway_id, tokens_addr=self.tokens_addr))

    def send(self, msg: Message) -> None:
        self.dealer.send_multipart(encode(msg))

    def _recv(self, sock: zmq.Socket, timeout_s: float) -> Message:
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"nothing received within {timeout_s} s")
        msg, _ = decode(sock.recv_multipart())
        return msg

    def status(self, timeout_s: float = 5.0) -> list[dict]:
        while self.dealer.poll(0):  # a late reply to an earlier query
            self.dealer.recv_multipart()
        self.send(StatusQuery())
        reply = self._recv(self.dealer, timeout_s)
        assert isinstance(reply, StatusReply)
        return reply.instances

    def submit(self, request_id: str, prompt_ids: list[int], sampling: dict) -> None:
        self.send(Submit(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling, gateway_id=self.gateway_id,
                         tokens_addr=self.tokens_addr, arrival_time=time.time()))

    def next_result(self, timeout_s: float = 30.0) -> TokenDelta | RequestError:
        msg = self._recv(self.pull, timeout_s)
        assert isinstance(msg, (TokenDelta, RequestError)), msg
        return msg

    def generate(self, prompt_ids: list[int], sampling: dict, timeout_s: float = 60.0) -> tuple[list[int], str]:
        request_id = uuid.uuid4().hex
        self.submit(request_id, prompt_ids, sampling)
        tokens: list[int] = []
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.next_result(max(0.1, deadline - time.monotonic()))
            assert msg.request_id == request_id
            if isinstance(msg, RequestError):
                return tokens, f"error {msg.code}: {msg.message}"
            tokens += msg.token_ids
            if msg.finish_reason is not None:
                return tokens, msg.finish_reason

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Services:
    def __init__(self) -> None:
        # Short path: ipc socket paths are limited to 107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="xbus-", dir="/tmp"))
        self.addresses = ServiceAddresses.from_run_dir(self.run_dir)
        self.log_path = self.run_dir / "services.log"
        self.log = open(self.log_path, "wb")
        self.procs: dict[str, subprocess.Popen] = {}
        self.offline: Future[list[int]] | None = None

    def start(self, name: str, *args: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", *args, "--run-dir", str(self.run_dir), "--log-level", "WARNING"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, process_group=0,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def offline_greedy_tokens() -> list[int]:
    from common.engine.llm import LLM

    return LLM(kv_cache_memory="16MiB", dtype="float32").generate([PROMPT], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def services():
    svc = Services()
    pool = ThreadPoolExecutor(1)
    try:
        svc.start("scheduler", "services.scheduler")
        svc.start("worker", "services.decode", "--instance-id", "w0", "--kv-cache-memory", "64MiB",
                  "--dtype", "float32", "--max-num-seqs", "8", "--threads", str(max(1, (os.cpu_count() or 2) // 2)))
        # The reference run loads its own model meanwhile, instead of after the worker is up.
        svc.offline = pool.submit(offline_greedy_tokens)
        yield svc
    finally:
        svc.stop()
        pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def client(services: Services):
    bus_client = BusClient(services.addresses)

    def ready():
        for name, proc in services.procs.items():
            assert proc.poll() is None, f"{name} exited early:\n{services.logs()[-3000:]}"
        try:
            return [i for i in bus_client.status(timeout_s=1.0) if i["id"] == "w0"]
        except TimeoutError:
            return None

    wait_until(ready, STARTUP_TIMEOUT_S, "the worker to register")
    yield bus_client
    bus_client.close()


def used_pages(client: BusClient) -> int:
    (inst,) = client.status()
    return inst["stats"]["used_pages"]


def test_greedy_tokens_match_offline_engine(services: Services, client: BusClient) -> None:
    tokens, finish = client.generate(PROMPT, GREEDY.to_dict())
    assert finish == "length" and len(tokens) == 6
    assert tokens == services.offline.result(timeout=STARTUP_TIMEOUT_S)
    # The worker's RequestFinished cleared the scheduler's table.
    wait_until(lambda: client.status()[0]["inflight"] == 0, 5, "the request to leave the scheduler's table")


def test_n2_streams_both_choices(client: BusClient) -> None:
    request_id = "n2-" + uuid.uuid4().hex
    client.submit(request_id, PROMPT, SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=3,
                                                      ignore_eos=True).to_dict())
    finished: dict[int, int] = {}
    counts = {0: 0, 1: 0}
    while len(finished) < 2:
        msg = client.next_result()
        assert isinstance(msg, TokenDelta) and msg.request_id == request_id
        counts[msg.index] += len(msg.token_ids)
        if msg.finish_reason:
            finished[msg.index] = msg.num_output_tokens
    assert counts == {0: 3, 1: 3} and finished == {0: 3, 1: 3}


def test_finish_choice_stops_one_choice_and_keeps_the_other(client: BusClient) -> None:
    request_id = "fc-" + uuid.uuid4().hex
    client.submit(request_id, PROMPT, SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=40,
                                                      ignore_eos=True).to_dict())
    counts = {0: 0, 1: 0}
    while counts[0] < 2:
        msg = client.next_result()
        assert isinstance(msg, TokenDelta)
        counts[msg.index] += len(msg.token_ids)
    client.send(FinishChoice(request_id=request_id, index=0))
    at_finish = counts[0]
    finish = None
    while finish is None:
        msg = client.next_result()
        assert isinstance(msg, TokenDelta)
        counts[msg.index] += len(msg.token_ids)
        if msg.index == 1:
            finish = msg.finish_reason
    # Choice 0 stopped within a step or two of the message; choice 1 ran to its length.
    assert counts[0] <= at_finish + 2 and counts[0] < 40
    assert finish == "length" and counts[1] == 40


def test_bad_input_is_answered_with_400(client: BusClient) -> None:
    _, result = client.generate(PROMPT, {"temperature": -1.0})
    assert result.startswith("error 400") and "temperature" in result
    _, result = client.generate([10**9], {"max_tokens": 2})
    assert result.startswith("error 400") and "vocabulary" in result
    _, result = client.generate(PROMPT, {"no_such_param": 1})
    assert result.startswith("error 400") and "no_such_param" in result
    tokens, finish = client.generate(PROMPT, {"temperature": 0.0, "max_tokens": 2})
    assert finish in ("length", "stop") and tokens


def test_malformed_bus_messages_are_dropped(services: Services, client: BusClient) -> None:
    ctx = zmq.Context()
    try:
        garbage = [
            [b"\xc1not msgpack"],
            [msgpack.packb({"t": "submit", "v": 999, "d": {}})],
            [msgpack.packb({"t": "no_such_type", "v": 1, "d": {}})],
            [msgpack.packb({"t": "submit", "v": 1, "d": {"request_id": 5}})],
            [msgpack.packb([1, 2, 3])],
            [b""],
        ]
        sockets = {}
        for name, address in (("frontend", services.addresses.frontend), ("backend", services.addresses.backend),
                              ("kv", services.addresses.kv_addr("w0"))):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(address)
            for frames in garbage:
                sock.send_multipart(frames)
            sockets[name] = sock
        # Well-formed but out of place: a heartbeat from nobody, a worker message on the frontend.
        ghost = Heartbeat(
            instance_id="ghost", role="decode", waiting=0, running=0, free_pages=0, total_pages=0, used_pages=0,
            prefix_hit_rate=0.0, queued_prefill_tokens=0, max_num_seqs=0, draining=False, flipping=False,
            kv_namespace="", prompt_tokens_total=0, generated_tokens_total=0, stats={})
        sockets["backend"].send_multipart(encode(ghost))
        sockets["frontend"].send_multipart(encode(ghost))
        # The worker's kv socket answers a transfer it cannot take with a clear refusal.
        sockets["kv"].send_multipart(encode(KvTransferChunk(
            transfer_id="kv1", layer_start=0, num_layers=1, last=True), torch.zeros(4)))
        assert sockets["kv"].poll(10_000), "no answer from the worker's kv socket"
        ack, _ = decode(sockets["kv"].recv_multipart())
        assert isinstance(ack, KvTransferAck) and not ack.ok and ack.transfer_id == "kv1"
    finally:
        ctx.destroy(linger=0)
    # Everything keeps working, and the drops were logged with a reason.
    tokens, finish = client.generate(PROMPT, {"temperature": 0.0, "max_tokens": 2})
    assert finish in ("length", "stop") and tokens
    assert [i["id"] for i in client.status()] == ["w0"]
    for proc in services.procs.values():
        assert proc.poll() is None
    logs = wait_until(lambda: (text := services.logs()).count("dropped invalid message") >= 18 and text,
                      5, "the drops to be logged")
    assert "dropped invalid message on ROUTER socket" in logs
    assert "wrong protocol version" in logs and "unknown message type" in logs
    assert "not a gateway message" in logs


def test_abort_frees_pages(client: BusClient) -> None:
    request_id = "abort-" + uuid.uuid4().hex
    long_prompt = PROMPT * 8  # several KV pages
    client.submit(request_id, long_prompt, {"temperature": 0.0, "max_tokens": 500, "ignore_eos": True})
    for _ in range(3):
        msg = client.next_result()
        assert isinstance(msg, TokenDelta) and msg.finish_reason is None
    wait_until(lambda: used_pages(client) > 0, 5, "the worker to report pages in use")
    client.send(Abort(request_id=request_id, reason="client disconnected"))
    wait_until(lambda: used_pages(client) == 0 and client.status()[0]["inflight"] == 0, 10,
               "the aborted request's pages to be freed")
    # The stream stops well before max_tokens.
    time.sleep(0.5)
    drained = 0
    while client.pull.poll(0):
        client.pull.recv_multipart()
        drained += 1
    assert drained < 50


def test_dead_worker_fails_its_requests_then_no_worker(services: Services, client: BusClient) -> None:
    request_id = "dead-" + uuid.uuid4().hex
    client.submit(request_id, PROMPT, {"temperature": 0.0, "max_tokens": 1000, "ignore_eos": True})
    msg = client.next_result()
    assert isinstance(msg, TokenDelta)
    services.procs["worker"].kill()
    services.procs["worker"].wait(timeout=10)
    started = time.monotonic()
    while True:  # deltas already queued may come first
        msg = client.next_result(timeout_s=10)
        if isinstance(msg, RequestError):
            break
    assert msg.request_id == request_id and msg.code == 503 and "worker died" in msg.message
    assert time.monotonic() - started < 6.0  # 3 s heartbeat timeout + a reaper tick
    assert client.status() == []
    _, result = client.generate(PROMPT, {"max_tokens": 2})
    assert result == "error 503: no worker available"
