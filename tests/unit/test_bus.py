"""The asyncio ZeroMQ helpers over real sockets (ipc:// in a temp dir and tcp://127.0.0.1)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import torch
import uvloop
import zmq
import zmq.asyncio

from common import bus
from common.codec import encode
from common.protocol import (
    BACKEND,
    CONTROL,
    FRONTEND,
    PROTOCOL_VERSION,
    TOPIC_ALL,
    Assign,
    Drain,
    KvTransferAck,
    ProtocolError,
    Register,
    RegisterAck,
    Sampling,
    Shutdown,
    StatusQuery,
    TokenDelta,
)

WAIT_S = 5.0  # generous bound for anything that should happen
SILENCE_S = 0.5  # how long "nothing arrives" is watched


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    # Short on purpose: ipc paths must fit in 107 bytes, pytest's tmp_path may not.
    directory = Path(tempfile.mkdtemp(prefix="xbus-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["ipc", "tcp"])
def address(request: pytest.FixtureRequest, ipc_dir: Path) -> str:
    if request.param == "ipc":
        return bus.ipc_address("test", "run1", directory=ipc_dir)
    return f"tcp://127.0.0.1:{bus.free_tcp_port()}"


@asynccontextmanager
async def zmq_context() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    try:
        yield context
    finally:
        bus.stop_authenticators(context)
        context.destroy(linger=0)


def run(coro_fn: Callable[[], Awaitable[None]], *, use_uvloop: bool = False) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout=15)

    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bounded())
    else:
        asyncio.run(bounded())


async def recv_within(sock: zmq.asyncio.Socket, timeout: float = WAIT_S):
    return await asyncio.wait_for(bus.recv(sock), timeout)


async def assert_nothing_arrives(sock: zmq.asyncio.Socket) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(bus.recv(sock), SILENCE_S)


def register_msg(instance_id: str = "w1") -> Register:
    return Register(
        instance_id=instance_id, role="mixed", kv_addr="ipc:///tmp/kv", num_pages=128,
        page_size=16, model="smollm2", max_model_len=2048,
    )


def token_delta(index: int = 0) -> TokenDelta:
    return TokenDelta(
        request_id="r1", index=index, token_ids=[5, 6], logprobs=None, finish_reason=None,
        num_prompt_tokens=3, num_output_tokens=2,
    )


# --------------------------------------------------------------------------------- round trips


def test_router_dealer_round_trip(address: str) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            router = bus.make_socket(zmq.ROUTER, context=context)
            dealer = bus.make_socket(zmq.DEALER, context=context, routing_id=b"w1")
            bus.connect(dealer, bus.bind(router, address))

            kv = torch.randn(2, 8).to(torch.bfloat16)
            await bus.send(dealer, register_msg(), kv)
            identity, msg, tensors = await recv_within(router)
            assert identity == b"w1" and msg == register_msg()
            assert tensors[0].dtype == torch.bfloat16 and torch.equal(tensors[0], kv)

            await bus.send(router, RegisterAck(instance_id="w1", accepted=True), identity=identity)
            peer, reply, tensors = await recv_within(dealer)
            assert peer is None and reply == RegisterAck(instance_id="w1", accepted=True) and tensors == []
            bus.close(router)
            bus.close(dealer)

    run(scenario)


def test_push_pull_round_trip_keeps_order(address: str) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            pull = bus.make_socket(zmq.PULL, context=context)
            push = bus.make_socket(zmq.PUSH, context=context)
            bus.connect(push, bus.bind(pull, address))
            for index in range(20):
                await bus.send(push, token_delta(index))
            received = [(await recv_within(pull))[1].index for _ in range(20)]
            assert received == list(range(20))
            bus.close(pull)
            bus.close(push)

    run(scenario)


def test_round_trip_under_uvloop(ipc_dir: Path) -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with zmq_context() as context:
            pull = bus.make_socket(zmq.PULL, context=context)
            push = bus.make_socket(zmq.PUSH, context=context)
            bus.connect(push, bus.bind(pull, bus.ipc_address("uv", "run1", directory=ipc_dir)))
            await bus.send(push, token_delta(), torch.arange(4))
            _, msg, (tensor,) = await recv_within(pull)
            assert msg == token_delta() and tensor.tolist() == [0, 1, 2, 3]
            bus.close(pull)
            bus.close(push)

    run(scenario, use_uvloop=True)


def test_pub_sub_delivers_exact_topics_only(address: str) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            pub = bus.make_socket(zmq.PUB, context=context)
            sub = bus.make_socket(zmq.SUB, context=context)
            bus.subscribe(sub, "w1", TOPIC_ALL)
            bus.connect(sub, bus.bind(pub, address))

            # PUB drops everything until the subscription has travelled: probe until it has.
            async def first_broadcast() -> tuple:
                while True:
                    await bus.send(pub, Shutdown(), topic=TOPIC_ALL)
                    try:
                        return await asyncio.wait_for(bus.recv(sub), 0.1)
                    except asyncio.TimeoutError:
                        continue

            topic, msg, _ = await asyncio.wait_for(first_broadcast(), WAIT_S)
            assert topic == TOPIC_ALL and msg == Shutdown()
            while True:  # swallow the extra probes that were already in flight
                try:
                    await asyncio.wait_for(bus.recv(sub), 0.2)
                except asyncio.TimeoutError:
                    break

            await bus.send(pub, Drain(instance_id="w10"), topic="w10")  # prefix of w1's topic
            await bus.send(pub, Drain(instance_id="w1"), topic="w1")
            topic, msg, _ = await recv_within(sub)
            assert topic == b"w1" and msg == Drain(instance_id="w1")
            await assert_nothing_arrives(sub)
            bus.close(pub)
            bus.close(sub)

    run(scenario)


def test_send_checks_routing_arguments(ipc_dir: Path) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            router = bus.make_socket(zmq.ROUTER, context=context)
            pub = bus.make_socket(zmq.PUB, context=context)
            push = bus.make_socket(zmq.PUSH, context=context)
            with pytest.raises(ValueError, match="identity"):
                await bus.send(router, Shutdown())
            with pytest.raises(ValueError, match="topic"):
                await bus.send(pub, Shutdown())
            with pytest.raises(ValueError, match="identity"):
                await bus.send(push, Shutdown(), identity=b"x")
            for sock in (router, pub, push):
                bus.close(sock)

    run(scenario)


# ----------------------------------------------------------------------------- bad messages


def test_malformed_frames_are_dropped_and_logged(address: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            router = bus.make_socket(zmq.ROUTER, context=context)
            dealer = bus.make_socket(zmq.DEALER, context=context, routing_id=b"evil-peer")
            bus.connect(dealer, bus.bind(router, address))
            await dealer.send_multipart([b"\xc1 not msgpack"])
            await dealer.send_multipart([msgpack.packb({"t": "nuke", "v": PROTOCOL_VERSION, "d": {}})])
            await dealer.send_multipart([msgpack.packb({"t": "drain", "v": PROTOCOL_VERSION, "d": {"instance_id": 5}})])
            await bus.send(dealer, Drain(instance_id="w1"))
            identity, msg, _ = await recv_within(router)
            assert identity == b"evil-peer" and msg == Drain(instance_id="w1")
            bus.close(router)
            bus.close(dealer)

    with caplog.at_level(logging.WARNING, logger="common.bus"):
        run(scenario)
    warnings = [record.getMessage() for record in caplog.records if record.name == "common.bus"]
    assert len(warnings) == 3
    assert all("evil-peer" in text for text in warnings)
    assert "not valid msgpack" in warnings[0]
    assert "unknown message type 'nuke'" in warnings[1]
    assert "'instance_id' has the wrong type" in warnings[2]


def test_empty_frame_is_dropped(ipc_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            pull = bus.make_socket(zmq.PULL, context=context)
            push = bus.make_socket(zmq.PUSH, context=context)
            bus.connect(push, bus.bind(pull, bus.ipc_address("p", "run1", directory=ipc_dir)))
            await push.send_multipart([b""])  # an empty frame: no message at all
            await bus.send(push, Shutdown())
            assert (await recv_within(pull))[1] == Shutdown()
            bus.close(pull)
            bus.close(push)

    with caplog.at_level(logging.WARNING, logger="common.bus"):
        run(scenario)
    assert any("not valid msgpack" in record.getMessage() for record in caplog.records)


def test_oversize_peer_is_cut_off_and_receiver_serves_the_next(address: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            pull = bus.make_socket(zmq.PULL, context=context, max_message_bytes=1024)
            endpoint = bus.bind(pull, address)
            big_sender = bus.make_socket(zmq.PUSH, context=context)
            bus.connect(big_sender, endpoint)
            # Over MAXMSGSIZE: libzmq disconnects this peer before Python sees anything.
            await bus.send(big_sender, KvTransferAck(transfer_id="big", ok=True), torch.zeros(4096, dtype=torch.uint8))
            await assert_nothing_arrives(pull)

            # Each frame under MAXMSGSIZE but the message over it: recv drops it.
            small_frames = torch.zeros(600, dtype=torch.uint8)
            next_sender = bus.make_socket(zmq.PUSH, context=context)
            bus.connect(next_sender, endpoint)
            await next_sender.send_multipart(encode(KvTransferAck(transfer_id="sum", ok=True), small_frames, small_frames), copy=False)
            await bus.send(next_sender, KvTransferAck(transfer_id="ok", ok=True))
            _, msg, _ = await recv_within(pull)
            assert msg.transfer_id == "ok"

            # A socket refuses to send what its own limit says is too big.
            limited = bus.make_socket(zmq.PUSH, context=context, max_message_bytes=100)
            with pytest.raises(ProtocolError, match="exceeds the 100 limit"):
                await bus.send(limited, KvTransferAck(transfer_id="x" * 200, ok=True))
            for sock in (pull, big_sender, next_sender, limited):
                bus.close(sock)

    with caplog.at_level(logging.WARNING, logger="common.bus"):
        run(scenario)
    dropped = [record.getMessage() for record in caplog.records if "exceeds the 1024 limit" in record.getMessage()]
    assert len(dropped) == 1  # only the multi-frame one reached Python; libzmq cut the other


# -------------------------------------------------------------------------------- channels


def test_a_channel_socket_drops_foreign_messages_and_refuses_to_send_them(
    ipc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            scheduler = bus.make_socket(zmq.ROUTER, context=context, channel=BACKEND.binder)
            worker = bus.make_socket(zmq.DEALER, context=context, routing_id=b"w1", channel=BACKEND.connector)
            raw = bus.make_socket(zmq.DEALER, context=context, routing_id=b"raw")  # no channel: sends anything
            endpoint = bus.bind(scheduler, bus.ipc_address("backend", "run1", directory=ipc_dir))
            bus.connect(worker, endpoint)
            bus.connect(raw, endpoint)

            await bus.send(raw, Drain(instance_id="w1"))  # a control message on the backend
            await bus.send(raw, RegisterAck(instance_id="w1", accepted=True))  # for workers, not the scheduler
            await bus.send(raw, register_msg("raw"))  # after the two drops: same connection, in order
            await bus.send(worker, register_msg())
            received = dict([(await recv_within(scheduler))[:2] for _ in range(2)])
            assert received == {b"raw": register_msg("raw"), b"w1": register_msg()}

            # The sending side refuses what its peer would drop.
            with pytest.raises(ProtocolError, match="does not travel from the worker on the backend channel"):
                await bus.send(worker, RegisterAck(instance_id="w1", accepted=True))
            with pytest.raises(ProtocolError, match="does not travel from the scheduler"):
                await bus.send(scheduler, register_msg(), identity=b"w1")
            assign = Assign(request_id="r", prompt_ids=[1], sampling=Sampling(), priority="online", gateway_id="g",
                            tokens_addr="ipc:///tmp/t", prefill_instance="w1", decode_instance="w1", arrival_time=0.0)
            await bus.send(scheduler, assign, identity=b"w1")
            assert (await recv_within(worker))[1] == assign
            for sock in (scheduler, worker, raw):
                bus.close(sock)

    with caplog.at_level(logging.WARNING, logger="common.bus"):
        run(scenario)
    warnings = [record.getMessage() for record in caplog.records if record.name == "common.bus"]
    assert len(warnings) == 2 and all("identity=b'raw'" in text for text in warnings)
    assert "drain is not a worker message (the scheduler's backend socket)" in warnings[0]
    assert "register_ack is not a worker message" in warnings[1]


def test_a_subscriber_takes_only_its_channel(ipc_dir: Path) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            pub = bus.make_socket(zmq.PUB, context=context)  # raw: may publish anything
            sub = bus.make_socket(zmq.SUB, context=context, channel=CONTROL.connector)
            bus.subscribe(sub, TOPIC_ALL)
            bus.connect(sub, bus.bind(pub, bus.ipc_address("control", "run1", directory=ipc_dir)))

            async def first() -> tuple:
                while True:
                    await bus.send(pub, token_delta(), topic=TOPIC_ALL)  # dropped by the channel
                    await bus.send(pub, Shutdown(), topic=TOPIC_ALL)
                    try:
                        return await asyncio.wait_for(bus.recv(sub), 0.1)
                    except asyncio.TimeoutError:
                        continue

            _, msg, _ = await asyncio.wait_for(first(), WAIT_S)
            assert msg == Shutdown()
            bus.close(pub)
            bus.close(sub)

    run(scenario)


def test_a_refused_message_of_a_known_type_can_still_be_answered(ipc_dir: Path) -> None:
    async def scenario() -> None:
        async with zmq_context() as context:
            scheduler = bus.make_socket(zmq.ROUTER, context=context, channel=FRONTEND.binder)
            gateway = bus.make_socket(zmq.DEALER, context=context, routing_id=b"g1")
            bus.connect(gateway, bus.bind(scheduler, bus.ipc_address("frontend", "run1", directory=ipc_dir)))
            fields = {"request_id": "r1", "prompt_ids": [1], "sampling": {"no_such_param": 1}, "gateway_id": "g1",
                      "tokens_addr": "ipc:///tmp/t", "arrival_time": 0.0}
            await gateway.send_multipart([msgpack.packb({"t": "submit", "v": PROTOCOL_VERSION, "d": fields})])
            await gateway.send_multipart([b"\xc1 not msgpack"])  # no type known: nothing to answer
            refused: list = []

            async def answer(peer: bytes | None, error: ProtocolError) -> None:
                refused.append((peer, error.tag, error.fields, error.reason))

            await gateway.send_multipart(encode(StatusQuery()))
            _, msg, _ = await asyncio.wait_for(bus.recv(scheduler, on_refused=answer), WAIT_S)
            assert msg == StatusQuery()
            assert refused == [(b"g1", "submit", fields, "submit: unexpected field 'no_such_param' in sampling")]
            bus.close(scheduler)
            bus.close(gateway)

    run(scenario)


# ------------------------------------------------------------------------------- ipc files


def test_ipc_file_is_removed_on_close(ipc_dir: Path) -> None:
    address = bus.ipc_address("frontend", "run1", directory=ipc_dir / "nested")
    path = Path(address[len("ipc://"):])
    context = zmq.asyncio.Context()
    try:
        sock = bus.make_socket(zmq.ROUTER, context=context)
        assert bus.bind(sock, address) == address
        assert path.exists() and (path.parent.stat().st_mode & 0o777) == 0o700
        bus.close(sock)
        assert not path.exists()
    finally:
        context.destroy(linger=0)


def test_stale_ipc_file_is_replaced_but_a_live_one_is_not(ipc_dir: Path) -> None:
    address = bus.ipc_address("backend", "run1", directory=ipc_dir)
    path = address[len("ipc://"):]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # leaves the socket file behind, like a crashed process
    context = zmq.asyncio.Context()
    try:
        owner = bus.make_socket(zmq.ROUTER, context=context)
        bus.bind(owner, address)
        intruder = bus.make_socket(zmq.ROUTER, context=context)
        with pytest.raises(OSError) as info:
            bus.bind(intruder, address)
        assert info.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)  # the live owner keeps its address
        bus.close(intruder)
        bus.close(owner)

        Path(path).write_text("not a socket")
        refused = bus.make_socket(zmq.ROUTER, context=context)
        with pytest.raises(FileExistsError):
            bus.bind(refused, address)
        bus.close(refused)
    finally:
        context.destroy(linger=0)


# -------------------------------------------------------------------------------- CurveZMQ


def test_curve_only_authorized_clients_get_through(tmp_path: Path) -> None:
    server_public, server_secret = bus.generate_keys(tmp_path / "server", "scheduler")
    client_public, client_secret = bus.generate_keys(tmp_path / "clients", "worker")
    _, rogue_secret = bus.generate_keys(tmp_path / "rogue", "rogue")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(client_public, authorized / client_public.name)
    address = f"tcp://127.0.0.1:{bus.free_tcp_port()}"

    async def scenario() -> None:
        async with zmq_context() as context:
            server = bus.make_socket(zmq.ROUTER, context=context)
            bus.configure_curve_server(server, server_secret, authorized)
            bus.bind(server, address)

            rogue = bus.make_socket(zmq.DEALER, context=context, routing_id=b"rogue")
            bus.configure_curve_client(rogue, rogue_secret, server_public)
            plain = bus.make_socket(zmq.DEALER, context=context, routing_id=b"plain")
            for intruder in (rogue, plain):
                bus.connect(intruder, address)
                await bus.send(intruder, register_msg("intruder"))
            await assert_nothing_arrives(server)

            client = bus.make_socket(zmq.DEALER, context=context, routing_id=b"w1")
            bus.configure_curve_client(client, client_secret, server_public)
            bus.connect(client, address)
            await bus.send(client, register_msg("w1"))
            identity, msg, _ = await recv_within(server)
            assert identity == b"w1" and msg == register_msg("w1")
            await bus.send(server, RegisterAck(instance_id="w1", accepted=True), identity=identity)
            assert (await recv_within(client))[1].accepted is True
            await assert_nothing_arrives(server)  # the intruders' queued messages never arrive
            for sock in (server, rogue, plain, client):
                bus.close(sock)

    run(scenario)


# ------------------------------------------------------------------------------ addresses


def test_address_helpers(monkeypatch: pytest.MonkeyPatch, ipc_dir: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))
    assert bus.default_ipc_dir() == ipc_dir / "xllm"
    assert bus.ipc_address("tokens", "abc") == f"ipc://{ipc_dir}/xllm/abc-tokens.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert bus.default_ipc_dir().name == f"xllm-{os.getuid()}"
    with pytest.raises(ValueError, match="longer than"):
        bus.ipc_address("x" * 120, "run1", directory=ipc_dir)

    port = bus.free_tcp_port()
    assert 0 < port < 65536
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # it really was free

    context = zmq.asyncio.Context()
    try:
        sock = bus.make_socket(zmq.PULL, context=context, max_message_bytes=4096, linger_ms=0)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 4096 and sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.RCVHWM) == bus.DEFAULT_HWM
        endpoint = bus.bind(sock, "tcp://127.0.0.1:0")
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
        with pytest.raises(ValueError, match="unsupported"):
            bus.bind(sock, "udp://127.0.0.1:9")
        bus.close(sock)
    finally:
        context.destroy(linger=0)
