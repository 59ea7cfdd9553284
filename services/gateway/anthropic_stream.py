"""Anthropic-style SSE for `/v1/messages` with `stream: true`.

Events: `message_start`, `ping`, then per content block `content_block_start` /
`content_block_delta` (`text_delta` or `input_json_delta`) / `content_block_stop`, then
`message_delta` (stop reason, output tokens) and `message_stop`. Like the OpenAI stream, the
response starts with the first tokens, so an error before any token gets its HTTP status; an
error later is an in-band `error` event.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.gateway.anthropic_schema import error_body, stop_reason, tool_use_id
from services.gateway.context import GatewayContext
from services.gateway.generation import Generation
from services.gateway.httpio import dumps
from services.gateway.openai_schema import APIError
from services.gateway.tool_parsers import StreamPiece
from services.gateway.tools import ReplyParser


class _Blocks:
    """Which content block is open, and the events that open, feed and close blocks."""

    def __init__(self) -> None:
        self.count = 0
        self.open: str | None = None  # "text" | "tool_use"
        self.events: list[tuple[str, dict[str, Any]]] = []

    def start(self, block: dict[str, Any]) -> None:
        self.close()
        self.open = block["type"]
        self.events.append(("content_block_start",
                            {"type": "content_block_start", "index": self.count, "content_block": block}))

    def close(self) -> None:
        if self.open is not None:
            self.events.append(("content_block_stop", {"type": "content_block_stop", "index": self.count}))
            self.open = None
            self.count += 1

    def _delta(self, delta: dict[str, Any]) -> None:
        self.events.append(("content_block_delta",
                            {"type": "content_block_delta", "index": self.count, "delta": delta}))

    def add(self, piece: StreamPiece) -> None:
        if piece.content:
            if self.open != "text":
                self.start({"type": "text", "text": ""})
            self._delta({"type": "text_delta", "text": piece.content})
        for call in piece.calls:
            if call.id is not None:
                self.start({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": {}})
            if call.arguments:
                self._delta({"type": "input_json_delta", "partial_json": call.arguments})

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        events, self.events = self.events, []
        return events


async def stream_message(request: web.Request, ctx: GatewayContext, gen: Generation,
                         replies: ReplyParser) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def send(events: list[tuple[str, dict[str, Any]]]) -> None:
        if not response.prepared:
            await response.prepare(request)
        if events:
            await response.write("".join(f"event: {name}\ndata: {dumps(data)}\n\n" for name, data in events).encode())

    streamer = replies.streamer()
    blocks = _Blocks()
    start = [
        ("message_start", {"type": "message_start", "message": {
            "id": gen.request_id, "type": "message", "role": "assistant", "model": ctx.model.model_id,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0}}}),
        ("ping", {"type": "ping"}),
    ]
    finish: str | None = None
    try:
        async for updates in gen.updates():
            for u in updates:
                piece = StreamPiece(content=u.text) if streamer is None else streamer.feed(u.text)
                if u.finish_reason is not None:
                    finish = u.finish_reason
                    if streamer is not None:
                        piece.extend(streamer.finish())
                if not replies.request.parallel:  # disable_parallel_tool_use: the first call only
                    piece.calls = [call for call in piece.calls if call.index == 0]
                blocks.add(piece)
            await send(start + blocks.take())
            start = []
        if blocks.count == 0 and blocks.open is None:
            blocks.add(StreamPiece(content=" ")) if False else blocks._start({"type": "text", "text": ""})
        blocks.close()
        calls_made = streamer is not None and streamer.num_calls > 0
        reason, sequence = stop_reason(gen, finish, calls_made)
        await send(start + blocks.take() + [
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                               "usage": {"output_tokens": gen.completion_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ])
    except APIError as error:
        if not response.prepared:
            raise  # nothing sent yet: a plain HTTP error response
        await response.write(f"event: error\ndata: {dumps(error_body(error))}\n\n".encode())
    await response.write_eof()
    return response
