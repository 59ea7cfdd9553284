"""asyncio ZeroMQ helpers: sockets with the project's standard options, typed send/recv.

Every service talks through these (DESIGN.md §2). `recv` validates with `common.codec` and drops
a bad message with a logged warning (reason + peer), so a malformed or hostile peer can never
raise out of a service's receive loop. Works under uvloop (pyzmq's `zmq.asyncio` only needs the
loop's `add_reader`).

Frame layout on the wire: ROUTER adds/strips the peer identity frame; on PUB/SUB the first frame
is the topic followed by a NUL byte, so that subscribing to `b"worker-1"` does not also match
`b"worker-10"` (ZeroMQ matches topics by prefix); then the codec's frames.

CurveZMQ (optional, for tcp across hosts): a server socket accepts only clients whose public key
is in its authorized-keys directory; ZAP requests are answered by one `ThreadAuthenticator` per
context, so authentication keeps working while the event loop is busy. Curve options must be set
before `bind`/`connect`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket as pysocket
import stat
import tempfile
import weakref
from pathlib import Path

import torch
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from common.protocol import Message, ProtocolError

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_LINGER_MS",
    "make_socket",
    "advertised_address",
    "bind",
    "connect",
    "close",
    "subscribe",
    "send",
    "recv",
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
_authenticators: dict[int, ThreadAuthenticator] = {}


# -------------------------------------------------------------------------------------- sockets


def make_socket(
    socket_type: int,
    *,
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


async def send(
    sock: zmq.asyncio.Socket,
    msg: Message,
    *tensors: torch.Tensor,
    identity: bytes | None = None,
    topic: bytes | str | None = None,
) -> None:
    """Send one message (+ tensors as raw zero-copy frames).

    ROUTER sockets need the peer's `identity`; PUB sockets need a `topic` (an instance id or
    `protocol.TOPIC_ALL`). A tensor must not be modified in place until the send completed.
    Raises ProtocolError for a message that cannot be encoded or exceeds the socket's MAXMSGSIZE.
    """
    socket_type = sock.getsockopt(zmq.TYPE)
    max_bytes = sock.getsockopt(zmq.MAXMSGSIZE)
    frames: list = encode(msg, *tensors, max_bytes=max_bytes if max_bytes > 0 else None)
    if socket_type == zmq.ROUTER:
        if identity is None:
            raise ValueError("a ROUTER socket needs the peer identity to send to")
        frames.insert(0, identity)
    elif identity is not None:
        raise ValueError("identity is only meaningful on a ROUTER socket")
    if socket_type in (zmq.PUB, zmq.XPUB):
        if topic is None:
            raise ValueError("a PUB socket needs a topic")
        topic_bytes = topic.encode() if isinstance(topic, str) else topic
        frames.insert(0, topic_bytes + _TOPIC_END)
    elif topic is not None:
        raise ValueError("topic is only meaningful on a PUB socket")
    await sock.send_multipart(frames, copy=False)


def _describe_peer(socket_type: int, frames: list[zmq.Frame], peer: bytes | None) -> str:
    if socket_type == zmq.ROUTER and peer is not None:
        return f"identity={peer!r}"
    try:
        address = frames[0].get("Peer-Address")
    except (zmq.ZMQError, AttributeError, IndexError):
        address = None
    return f"peer={address}" if address else "peer=unknown"


async def recv(
    sock: zmq.asyncio.Socket, *, max_bytes: int | None = None
) -> tuple[bytes | None, Message, list[torch.Tensor]]:
    """Receive the next valid message as (peer, message, tensors).

    `peer` is the sender's identity on a ROUTER socket, the topic on a SUB socket, else None.
    Invalid messages are dropped with a warning and receiving goes on; only socket errors
    (e.g. the socket was closed) or cancellation leave this function.
    `max_bytes` defaults to the socket's MAXMSGSIZE.
    """
    socket_type = sock.getsockopt(zmq.TYPE)
    if max_bytes is None:
        socket_limit = sock.getsockopt(zmq.MAXMSGSIZE)
        max_bytes = socket_limit if socket_limit > 0 else DEFAULT_MAX_MESSAGE_BYTES
    while True:
        frames = await sock.recv_multipart(copy=False)
        peer: bytes | None = None
        payload = frames
        reason: str | None = None
        if socket_type in (zmq.ROUTER, zmq.SUB, zmq.XSUB):
            peer = frames[0].bytes
            payload = frames[1:]
            if socket_type != zmq.ROUTER:
                if peer.endswith(_TOPIC_END):
                    peer = peer[: -len(_TOPIC_END)]
                else:
                    reason = "topic frame is not NUL-terminated"
        if reason is None and not payload:
            reason = "no message frames"
        if reason is None:
            try:
                msg, tensors = decode(payload, max_bytes=max_bytes)
                return peer, msg, tensors
            except ProtocolError as exc:
                reason = exc.reason
            except Exception as exc:  # a codec bug must not take the service down either
                logger.exception("codec failed on a message from %s", peer)
                reason = f"codec error: {type(exc).__name__}: {exc}"
        logger.warning(
            "dropped invalid message on %s socket from %s: %s",
            zmq.SocketType(socket_type).name,
            _describe_peer(socket_type, frames, peer),
            reason,
        )


# ------------------------------------------------------------------------------------ CurveZMQ


def generate_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Create `<name>.key` (public) and `<name>.key_secret` in `directory`; returns both paths."""
    Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(os.fspath(directory), name)
    return Path(public_file), Path(secret_file)


def _authenticator_for(context: zmq.Context) -> ThreadAuthenticator:
    # One ZAP handler per libzmq context (it binds a fixed inproc address). It must run on a
    # sync shadow of the same context: an asyncio socket cannot be driven from its thread.
    key = context.underlying
    auth = _authenticators.get(key)
    if auth is None:
        auth = ThreadAuthenticator(zmq.Context.shadow(key))
        auth.start()
        _authenticators[key] = auth
    return auth


def configure_curve_server(
    sock: zmq.Socket,
    secret_key_file: str | os.PathLike,
    authorized_keys_dir: str | os.PathLike,
) -> ThreadAuthenticator:
    """Make `sock` a CurveZMQ server that only accepts clients whose public key file
    (`*.key`) is in `authorized_keys_dir` (read now: call again after adding keys).
    Call before `bind`."""
    public_key, secret_key = zmq.auth.load_certificate(os.fspath(secret_key_file))
    if secret_key is None:
        raise ValueError(f"{secret_key_file} holds no secret key")
    authorized = Path(authorized_keys_dir).resolve()
    # A ZAP domain per key directory lets servers in one context trust different clients.
    domain = "xllm-" + hashlib.sha256(os.fsencode(authorized)).hexdigest()[:16]
    auth = _authenticator_for(sock.context)
    auth.configure_curve(domain=domain, location=os.fspath(authorized))
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    return auth


def configure_curve_client(
    sock: zmq.Socket,
    client_secret_key_file: str | os.PathLike,
    server_public_key_file: str | os.PathLike,
) -> None:
    """Make `sock` a CurveZMQ client of the server whose public key is given. Call before
    `connect`."""
    public_key, secret_key = zmq.auth.load_certificate(os.fspath(client_secret_key_file))
    if secret_key is None:
        raise ValueError(f"{client_secret_key_file} holds no secret key")
    server_key, _ = zmq.auth.load_certificate(os.fspath(server_public_key_file))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)


def stop_authenticators(context: zmq.Context | None = None) -> None:
    """Stop the ZAP thread of `context` (all contexts when None); needed before `context.term()`."""
    keys = list(_authenticators) if context is None else [context.underlying]
    for key in keys:
        auth = _authenticators.pop(key, None)
        if auth is not None:
            auth.stop()


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
