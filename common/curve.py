"""CurveZMQ for the bus (optional, for tcp across hosts): keys, server and client sockets.

A server socket accepts only clients whose public key is in its authorized-keys directory; ZAP
requests are answered by one `ThreadAuthenticator` per context, so authentication keeps working
while the event loop is busy. Curve options must be set before `bind`/`connect`. `common.bus`
re-exports these functions; services reach them through `common.service_config.CurveKeys`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["generate_keys", "configure_curve_server", "configure_curve_client", "stop_authenticators"]

_authenticators: dict[int, ThreadAuthenticator] = {}


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
