"""asyncio ZeroMQ helpers: sockets with the project's standard options, typed send/recv.

Every service talks through these (DESIGN.md §2). `recv` validates with `common.codec` and drops
a bad message with a logged warning (reason + peer), so a malformed or hostile peer can never
raise out of a service's receive loop; `common.bus_guard` keeps a flood of them cheap (pacing,
per-peer error budgets, counted and rate-limited log lines). Works under uvloop (pyzmq's
`zmq.asyncio` only needs the loop's `add_reader`).

A socket made for one end of a channel (`make_socket(..., channel=BACKEND.binder)`) only takes
what travels to that end: anything else is dropped inside `recv` like a malformed message, so a
receive loop sees only its channel's messages and can dispatch on type without a fallback.
Sending what the other end would drop raises ProtocolError (a bug in the sender).

Frame layout on the wire: ROUTER adds/strips the peer identity frame; on PUB/SUB the first frame
is the topic followed by a NUL byte, so that subscribing to `b"worker-1"` does not also match
`b"worker-10"` (ZeroMQ matches topics by prefix); then the codec's frames.

CurveZMQ lives in `common.curve` (re-exported here).
"""

from __future__ import annotations

import errno
import logging
import os
import socket as pysocket
import stat
import tempfile
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import torch
import zmq
import zmq.asyncio

from common.bus_guard import InboundGuard
from common.codec import DEFAULT_MAX_MESSAGE_BYTES, Refused, decode, encode
from common.curve import configure_curve_client, configure_curve_server, generate_keys, stop_authenticators
from common.protocol import ChannelEnd, Message, ProtocolError

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_LINGER_MS",
    "make_socket",
    "advertised_address",
    "bind",
    "connect",
    "close",
    "subscribe",
    "encode_for",
    "send",
    "recv",
    "OnRefused",
    "generate_keys",
    "configure_curve_server",
    "configure_curve_client",
    "stop_authenticators",
    "default_ipc_dir",
    "ipc_address",
    "free_tcp_port",
]

logger = logging.getLogger(__name__)

DEFAULT_LINGER_MS = 100
# Counted in messages, not bytes: high enough that a token stream does not stall a worker on a
# briefly slow gateway; sockets carrying big KV frames should pass a lower value.
DEFAULT_HWM = 10_000
DEFAULT_HEARTBEAT_IVL_MS = 1_000
DEFAULT_HEARTBEAT_TIMEOUT_MS = 5_000

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_IPC_PATH = 107
_TOPIC_END = b"\x00"

_bound_ipc_paths: weakref.WeakKeyDictionary[zmq.Socket, list[str]] = weakref.WeakKeyDictionary()


OnRefused = Callable[[bytes | None, ProtocolError], Awaitable[None]]


class _SocketInfo(NamedTuple):
    """What send/recv need to know of a socket, read once: getsockopt costs as much as encoding
    a token delta."""

    socket_type: int
    max_bytes: int | None  # MAXMSGSIZE, None when unlimited
    end: ChannelEnd | None
    guard: InboundGuard  # pacing, per-peer error budgets, counted and rate-limited drops (recv)
    # A plain (blocking-API) view of the same libzmq socket: `recv` drains what is already queued
    # through it without an asyncio Future per message (5-10x cheaper under a flood).
    sync: zmq.Socket


_socket_info: weakref.WeakKeyDictionary[zmq.Socket, _SocketInfo] = weakref.WeakKeyDictionary()


def _info(sock: zmq.Socket) -> _SocketInfo:
    info = _socket_info.get(sock)
    if info is None:  # a socket made elsewhere (raw test sockets): no channel
        limit = sock.getsockopt(zmq.MAXMSGSIZE)
        socket_type = sock.getsockopt(zmq.TYPE)
        info = _socket_info[sock] = _SocketInfo(socket_type, limit if limit > 0 else None, None,
                                                _guard_for(socket_type), _sync_view(sock))
    return info


def _sync_view(sock: zmq.Socket) -> zmq.Socket:
    # A shadow does not own the libzmq socket: `recv` uses it only while `sock` is open.
    return zmq.Socket.shadow(sock.underlying) if isinstance(sock, zmq.asyncio.Socket) else sock


def _guard_for(socket_type: int) -> InboundGuard:
    # Only a ROUTER names each sender, so only there can one peer be muted without the others.
    return InboundGuard(zmq.SocketType(socket_type).name, per_peer=socket_type == zmq.ROUTER)


# -------------------------------------------------------------------------------------- sockets


def make_socket(
    socket_type: int,
    *,
    channel: ChannelEnd | None = None,
    context: zmq.asyncio.Context | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    linger_ms: int = DEFAULT_LINGER_MS,
    sndhwm: int = DEFAULT_HWM,
    rcvhwm: int = DEFAULT_HWM,
    routing_id: bytes | None = None,
    heartbeat_ivl_ms: int = DEFAULT_HEARTBEAT_IVL_MS,
    heartbeat_timeout_ms: int = DEFAULT_HEARTBEAT_TIMEOUT_MS,
    router_mandatory: bool = False,
) -> zmq.asyncio.Socket:
    """An asyncio socket with the standard options.

    `channel`: the channel end this socket is (e.g. `BACKEND.connector` for a worker's DEALER to
    the scheduler); `recv` drops and `send` refuses messages that do not travel there. None (raw
    test sockets) lets any message through.
    `max_message_bytes` is ZeroMQ's MAXMSGSIZE: a peer sending a bigger frame is disconnected
    before anything reaches Python; `recv` also refuses a message whose frames sum past it.
    ZMTP heartbeats let a connection to a dead peer be noticed within seconds.
    `router_mandatory` makes a ROUTER send to an unknown identity raise (EHOSTUNREACH)
    instead of dropping it silently.
    """
    context = context or zmq.asyncio.Context.instance()
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if heartbeat_ivl_ms > 0:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if router_mandatory and socket_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    _socket_info[sock] = _SocketInfo(socket_type, max_message_bytes if max_message_bytes > 0 else None, channel,
                                     _guard_for(socket_type), _sync_view(sock))
    return sock


def _ipc_path(address: str) -> str | None:
    """The filesystem path of an ipc:// address (None for tcp, abstract or wildcard ipc)."""
    if not address.startswith("ipc://"):
        return None
    path = address[len("ipc://") :]
    if not path or path.startswith("@") or path == "*":
        return None
    return path


def _remove_stale_ipc_file(path: str) -> None:
    """Unlink a socket file left by a dead process; refuse to touch a live one or a non-socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket file", path)
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    else:
        raise OSError(errno.EADDRINUSE, "ipc address is in use by a live process", path)
    finally:
        probe.close()
    try:
        os.unlink(path)
        logger.info("removed stale ipc socket file %s", path)
    except FileNotFoundError:
        pass


def bind(sock: zmq.Socket, address: str) -> str:
    """Bind to an `ipc://` or `tcp://` address; returns the endpoint actually bound.

    ipc: the directory is created (0700) and a stale socket file is removed first.
    tcp: port 0 or `*` picks a free port (read it from the return value).
    """
    path = _ipc_path(address)
    if path is not None:
        if len(path.encode()) > _MAX_IPC_PATH:
            raise ValueError(f"ipc path longer than {_MAX_IPC_PATH} bytes: {path}")
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stale_ipc_file(path)
    elif address.startswith("tcp://") and address.endswith(":0"):
        address = address[:-2] + ":*"
    elif not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"unsupported bus address {address!r} (use ipc:// or tcp://)")
    sock.bind(address)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    bound_path = _ipc_path(endpoint)
    if bound_path is not None:
        _bound_ipc_paths.setdefault(sock, []).append(bound_path)
    return endpoint


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect to an `ipc://` or `tcp://` address (ZeroMQ retries until the peer binds)."""
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"unsupported bus address {address!r} (use ipc:// or tcp://)")
    sock.connect(address)


def close(sock: zmq.Socket, linger_ms: int | None = None) -> None:
    """Close a socket and remove the ipc socket files it bound.

    ZeroMQ removes them too, but asynchronously; doing it here means a restarted service or a
    test sees a clean directory as soon as this returns.
    """
    paths = _bound_ipc_paths.pop(sock, [])
    if not sock.closed:
        sock.close(linger=linger_ms)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def subscribe(sock: zmq.Socket, *topics: bytes | str) -> None:
    """Subscribe a SUB socket to exact topics (see the module docstring on prefix matching)."""
    for topic in topics:
        topic_bytes = topic.encode() if isinstance(topic, str) else topic
        sock.setsockopt(zmq.SUBSCRIBE, topic_bytes + _TOPIC_END)


# --------------------------------------------------------------------------------- send / recv


def encode_for(
    sock: zmq.Socket,
    msg: Message,
    *tensors: torch.Tensor,
    identity: bytes | None = None,
    topic: bytes | str | None = None,
) -> list:
    """The multipart frames `send` sends (for callers that send them without waiting: NOBLOCK).

    ROUTER sockets need the peer's `identity`; PUB sockets need a `topic` (an instance id or
    `protocol.TOPIC_ALL`). Raises ProtocolError for a message that cannot be encoded, exceeds
    the socket's MAXMSGSIZE, or does not travel from the socket's channel end.
    """
    socket_type, max_bytes, end, _, _ = _info(sock)
    if end is not None and type(msg) not in end.outbound:
        raise ProtocolError(f"{msg.TAG} does not travel from the {end.role} on the {end.channel} channel")
    out: list = encode(msg, *tensors, max_bytes=max_bytes)
    if socket_type == zmq.ROUTER:
        if identity is None:
            raise ValueError("a ROUTER socket needs the peer identity to send to")
        out.insert(0, identity)
    elif identity is not None:
        raise ValueError("identity is only meaningful on a ROUTER socket")
    if socket_type in (zmq.PUB, zmq.XPUB):
        if topic is None:
            raise ValueError("a PUB socket needs a topic")
        topic_bytes = topic.encode() if isinstance(topic, str) else topic
        out.insert(0, topic_bytes + _TOPIC_END)
    elif topic is not None:
        raise ValueError("topic is only meaningful on a PUB socket")
    return out


async def send(
    sock: zmq.asyncio.Socket,
    msg: Message,
    *tensors: torch.Tensor,
    identity: bytes | None = None,
    topic: bytes | str | None = None,
) -> None:
    """Send one message (+ tensors as raw zero-copy frames); see `encode_for` for the arguments and
    errors. A tensor must not be modified in place until the send completed."""
    await sock.send_multipart(encode_for(sock, msg, *tensors, identity=identity, topic=topic), copy=False)


def _describe_peer(socket_type: int, frames: list[zmq.Frame], peer: bytes | None) -> str:
    if socket_type == zmq.ROUTER and peer is not None:
        return f"identity={peer!r}"
    try:
        address = frames[0].get("Peer-Address")
    except (zmq.ZMQError, AttributeError, IndexError):
        address = None
    return f"peer={address}" if address else "peer=unknown"


async def recv(
    sock: zmq.asyncio.Socket, *, max_bytes: int | None = None, on_refused: OnRefused | None = None
) -> tuple[bytes | None, Message, list[torch.Tensor]]:
    """Receive the next valid message as (peer, message, tensors).

    `peer` is the sender's identity on a ROUTER socket, the topic on a SUB socket, else None.
    Invalid messages, and on a channel socket those that do not travel to its end, are dropped
    and receiving goes on (`common.bus_guard`: counted, rate-limited logs, per-peer error budgets,
    a yield to the event loop every few messages); only socket errors (e.g. the socket was closed)
    or cancellation leave this function. `max_bytes` defaults to the socket's MAXMSGSIZE.
    `on_refused(peer, error)` is awaited for a dropped message of a known type whose fields were
    wrong (`error.tag` / `error.fields`), so a service can still answer its sender.
    """
    socket_type, socket_limit, accept, guard, sync = _info(sock)
    if max_bytes is None:
        max_bytes = socket_limit if socket_limit is not None else DEFAULT_MAX_MESSAGE_BYTES
    while True:
        await guard.pace()
        frames = None
        if not sock.closed:  # (a closed socket: the awaited recv below raises the proper error)
            try:
                frames = sync.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
        if frames is None:
            frames = await sock.recv_multipart(copy=False)
        peer: bytes | None = None
        payload = frames
        reason: str | None = None
        kind = "framing"
        if socket_type in (zmq.ROUTER, zmq.SUB, zmq.XSUB):
            peer = frames[0].bytes
            if not guard.admit(peer):
                continue  # a muted peer: dropped unread (and counted)
            payload = frames[1:]
            if socket_type != zmq.ROUTER:
                if peer.endswith(_TOPIC_END):
                    peer = peer[: -len(_TOPIC_END)]
                else:
                    reason = "topic frame is not NUL-terminated"
        if reason is None and not payload:
            reason = "no message frames"
        refused: ProtocolError | None = None
        if reason is None:
            try:
                msg, tensors = decode(payload, max_bytes=max_bytes, accept=accept)
                return peer, msg, tensors
            except ProtocolError as exc:
                reason, refused = exc.reason, exc
                kind = exc.kind if isinstance(exc, Refused) else "invalid"
            except Exception as exc:  # a codec bug must not take the service down either
                logger.exception("codec failed on a message from %s", peer)
                reason, kind = f"codec error: {type(exc).__name__}: {exc}", "codec_error"
        guard.refused(peer, kind, reason, lambda: _describe_peer(socket_type, frames, peer))
        if on_refused is not None and refused is not None and refused.tag is not None:
            try:
                await on_refused(peer, refused)
            except Exception:  # answering a bad message must not stop the receiving either
                logger.exception("could not answer a refused %s", refused.tag)


# -------------------------------------------------------------------------------- addresses


def default_ipc_dir() -> Path:
    """Where ipc socket files live: `$XDG_RUNTIME_DIR/xllm`, else `<tmp>/xllm-<uid>`."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir) and os.access(runtime_dir, os.W_OK):
        return Path(runtime_dir) / "xllm"
    return Path(tempfile.gettempdir()) / f"xllm-{os.getuid()}"


def ipc_address(name: str, run_id: str, directory: str | os.PathLike | None = None) -> str:
    """`ipc://<dir>/<run_id>-<name>.sock`; the run id keeps concurrent deployments apart."""
    base = Path(directory) if directory is not None else default_ipc_dir()
    path = base / f"{run_id}-{name}.sock"
    if len(os.fsencode(path)) > _MAX_IPC_PATH:
        raise ValueError(f"ipc path longer than {_MAX_IPC_PATH} bytes: {path}")
    return f"ipc://{path}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests; another process may still take it)."""
    with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def advertised_address(endpoint: str, host: str | None = None) -> str:
    """What peers should connect to: a tcp wildcard bind is advertised under `host` (default:
    this machine's hostname, which resolves for peers on a compose network or a LAN)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    bound_host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if bound_host in ("0.0.0.0", "*", "[::]", "::") or host:
        return f"tcp://{host or pysocket.gethostname()}:{port}"
    return endpoint
