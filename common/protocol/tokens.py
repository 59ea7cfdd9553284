"""The tokens channel: a gateway's bound PULL, PUSH sockets of the workers (and of the scheduler,
for the errors it answers a request with) that send it per-request results."""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register

__all__ = ["TokensMessage", "TOKENS", "TokenDelta", "RequestError", "EmbeddingResult"]


class TokensMessage(Message):
    """A per-request result; `request_id` says which of the gateway's requests it belongs to."""

    request_id: str


TOKENS = Channel("tokens", TokensMessage, binder="gateway", connector="worker")


@register
@TOKENS.carries(to="gateway")
class TokenDelta(TokensMessage):
    TAG: ClassVar[str] = "token_delta"
    index: int  # which of the request's n choices
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    cached_tokens: int = 0
    # Who computed these tokens (worker id and process incarnation): the gateway migrates the
    # choice when that instance is reported dead or replaced.
    instance_id: str = ""
    incarnation: str = ""


@register
@TOKENS.carries(to="gateway")
class RequestError(TokensMessage):
    TAG: ClassVar[str] = "request_error"
    code: int
    message: str
    # True when the request may be tried again elsewhere and nothing about it was wrong: its
    # worker was lost ("worker_lost") or no worker can take it now ("no_worker").
    retriable: bool = False
    reason: str = ""


@register
@TOKENS.carries(to="gateway")
class EmbeddingResult(TokensMessage):
    """The pooled embedding of an embedding request (one input): `dim` little-endian float32
    values as raw bytes (4 KiB for a 1024-wide model, no per-float msgpack overhead)."""

    TAG: ClassVar[str] = "embedding_result"
    embedding: bytes
    dim: int
    num_prompt_tokens: int
