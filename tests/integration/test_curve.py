"""CurveZMQ on tcp: a worker with an authorized key registers, one without never does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from common.bus import configure_curve_client, free_tcp_port, generate_keys
from common.codec import decode, encode
from common.protocol import StatusQuery, StatusReply

REPO = Path(__file__).resolve().parents[2]


def status(ctx: zmq.Context, addr: str, keys: Path | None, name: str, timeout_s: float = 2.0) -> list[dict] | None:
    """One StatusQuery over a fresh DEALER; None when no reply comes back."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        configure_curve_client(sock, keys / f"{name}.key_secret", keys / "scheduler.key")
    sock.connect(addr)
    try:
        sock.send_multipart(encode(StatusQuery()))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply, _ = decode(sock.recv_multipart())
        assert isinstance(reply, StatusReply)
        return reply.instances
    finally:
        sock.close()


@pytest.fixture(scope="module")
def curve_topology(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    generate_keys(keys, "scheduler")
    (keys / "authorized").mkdir()
    for name in ("worker", "probe"):
        public, _ = generate_keys(keys, name)
        (keys / "authorized" / public.name).write_bytes(public.read_bytes())
    generate_keys(keys, "rogue")  # a valid certificate the scheduler does not trust
    ports = [free_tcp_port() for _ in range(3)]
    addrs = [f"tcp://127.0.0.1:{p}" for p in ports]
    common = ["--frontend-addr", addrs[0], "--backend-addr", addrs[1], "--control-addr", addrs[2],
              "--curve-dir", str(keys), "--log-level", "WARNING"]
    worker = ["--kv-cache-memory", "16MiB", "--threads", "1", "--tcp-host", "127.0.0.1", "--dtype", "float32"]
    log = open(keys / "services.log", "wb")
    procs = [
        subprocess.Popen([sys.executable, "-m", "services.scheduler", *common], cwd=REPO, stdout=log,
                         stderr=subprocess.STDOUT, process_group=0),
        subprocess.Popen([sys.executable, "-m", "services.decode", *common, *worker, "--instance-id", "trusted",
                          "--curve-key", "worker"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, process_group=0),
        subprocess.Popen([sys.executable, "-m", "services.decode", *common, *worker, "--instance-id", "intruder",
                          "--curve-key", "rogue"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, process_group=0),
    ]
    ctx = zmq.Context()
    try:
        yield ctx, addrs[0], keys
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        ctx.destroy(linger=0)
        log.close()


def test_only_peers_with_authorized_keys_get_through(curve_topology):
    ctx, frontend, keys = curve_topology
    deadline = time.monotonic() + 120
    ids: set[str] = set()
    while time.monotonic() < deadline:
        instances = status(ctx, frontend, keys, "probe")
        ids = {inst["id"] for inst in instances or []}
        if "trusted" in ids:
            break
        time.sleep(0.5)
    assert "trusted" in ids, (keys / "services.log").read_text(errors="replace")[-3000:]
    # The intruder loaded the same engine and heartbeats just as often; give it a few more beats.
    time.sleep(2.0)
    ids = {inst["id"] for inst in status(ctx, frontend, keys, "probe") or []}
    assert ids == {"trusted"}
    # Neither a plain client nor one with an untrusted certificate gets a reply.
    assert status(ctx, frontend, None, "", timeout_s=1.0) is None
    assert status(ctx, frontend, keys, "rogue", timeout_s=1.0) is None
