"""Sending per-request results to gateways' tokens sockets, and engine outputs as bus messages.

Workers stream TokenDelta / RequestError straight to the gateway that owns a request; the
scheduler sends its RequestErrors the same way. A gateway that is gone or stalled must never
block the sender's loop, so sends are non-blocking and a full queue drops the message with a
warning (the request is lost for a gateway that stopped reading anyway).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Any

import zmq
import zmq.asyncio

from common import bus
from common.protocol import TOKENS, ProtocolError, TokenDelta, TokensMessage

__all__ = ["GatewayPushers", "token_delta", "plain_logprobs"]

logger = logging.getLogger(__name__)


class GatewayPushers:
    """A cache of PUSH sockets, one per gateway tokens address (least recently used closed first)."""

    def __init__(self, context: zmq.asyncio.Context | None = None, max_sockets: int = 64) -> None:
        self._context = context or zmq.asyncio.Context.instance()
        self._max_sockets = max_sockets
        self._sockets: OrderedDict[str, zmq.asyncio.Socket] = OrderedDict()
        self.dropped = 0

    def _socket(self, address: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(address)
        if sock is not None:
            self._sockets.move_to_end(address)
            return sock
        sock = bus.make_socket(zmq.PUSH, context=self._context, channel=TOKENS.connector)
        try:
            bus.connect(sock, address)
        except (ValueError, zmq.ZMQError):
            sock.close(linger=0)
            raise
        self._sockets[address] = sock
        while len(self._sockets) > self._max_sockets:
            _, oldest = self._sockets.popitem(last=False)
            oldest.close(linger=0)
        return sock

    async def send(self, address: str, msg: TokensMessage) -> bool:
        """Queue `msg` for the gateway at `address`; False (and logged) when it was dropped."""
        try:
            sock = self._socket(address)
            await sock.send_multipart(bus.encode_for(sock, msg), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped += 1
            logger.warning("gateway at %s is not reading: dropped %s", address, msg.TAG)
        except (ValueError, zmq.ZMQError, ProtocolError) as exc:
            self.dropped += 1
            logger.warning("cannot send %s to %r: %s", msg.TAG, address, exc)
        return False

    def close(self) -> None:
        for sock in self._sockets.values():
            # A short linger lets the last deltas (finish reasons, errors) leave on shutdown.
            sock.close(linger=200)
        self._sockets.clear()


def plain_logprobs(logprobs: list[Any] | None) -> list | None:
    """Engine logprob records (dataclasses / named tuples) as msgpack-able dicts."""
    if logprobs is None:
        return None
    return [_plain(item) for item in logprobs]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {key: _plain(item) for key, item in value._asdict().items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # a tensor or numpy scalar
        return value.tolist()
    return value


def token_delta(output: Any) -> TokenDelta:
    """The bus form of one engine `SequenceOutput`."""
    return TokenDelta(
        request_id=output.request_id,
        index=output.index,
        token_ids=[int(token) for token in output.new_token_ids],
        logprobs=plain_logprobs(output.new_logprobs),
        finish_reason=output.finish_reason,
        num_prompt_tokens=output.num_prompt_tokens,
        num_output_tokens=output.num_output_tokens,
        cached_tokens=output.num_cached_tokens,
    )
