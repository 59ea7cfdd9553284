"""The tokens channel: a gateway's bound PULL, PUSH sockets of the workers (and of the scheduler,
for the errors it answers a request with) that send it per-request results."""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register

__all__ = ["TokensMessage", "TOKENS", "TokenDelta", "RequestError"]


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


@register
@TOKENS.carries(to="gateway")
class RequestError(TokensMessage):
    TAG: ClassVar[str] = "request_error"
    code: int
    message: str
