"""Incremental detokenization for streaming: text out as tokens come in, never half a character.

vLLM's prefix/read offset scheme, on token ids: every step decodes only the window
`ids[prefix_offset:]` and the already-emitted part `ids[prefix_offset:read_offset]`; the new text is
the difference. Decoding a window that starts at a character boundary gives the same text as the
same span inside a full decode (leading-space handling of SentencePiece decoders is the same for
both windows, so it cancels), so the concatenation of the deltas equals the full decode.

A window whose text ends in U+FFFD is held back: its last token(s) are an incomplete UTF-8
sequence (byte-level BPE pieces) that the next tokens will complete. A window that ends in a
SentencePiece byte-fallback token (`<0xE2>`) is held back too, even when its bytes decode: the
ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when any byte of the run is
invalid, so a later byte could change text already decoded from the run.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# Context tokens before the first generated token, so that the first delta gets the leading
# space / byte context it has in the full text (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5

# A character is at most 4 UTF-8 bytes, so an honest incomplete tail never needs this many
# tokens; past it the held text ends in a genuine U+FFFD (the model produced one) and is emitted,
# which keeps the per-token work bounded.
MAX_HELD_TOKENS = 32

# Drop consumed ids once this many sit before the window, so memory stays bounded too.
_COMPACT_AFTER = 1024


class _Decoder(Protocol):
    all_special_ids: list[int]
    # optional: byte_fallback_ids (frozenset[int]) for SentencePiece vocabularies

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Special tokens are dropped before windowing rather than by decode(): a window that
        # starts with a skipped token would otherwise have its first real token treated as the
        # start of the text (SentencePiece strips its leading space there, the full decode doesn't).
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._byte_ids: frozenset[int] = frozenset(getattr(tokenizer, "byte_fallback_ids", ()))
        context = self._visible(list(prompt_ids or []))[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(self._ids[: self._read_offset])
        self._pieces: list[str] = []
        self._finished = False

    def _visible(self, ids: list[int]) -> list[int]:
        if not self._special_ids:
            return ids
        return [i for i in ids if i not in self._special_ids]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they complete (may be empty)."""
        if self._finished:
            raise RuntimeError("push() after flush()")
        visible = self._visible(list(token_ids))
        if not visible:
            return ""
        self._ids.extend(visible)
        window_text = self._decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset
        incomplete = window_text.endswith(REPLACEMENT_CHAR) or self._ids[-1] in self._byte_ids
        if incomplete and held < MAX_HELD_TOKENS:
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Emit whatever is still held (the stream ended); further pushes are an error."""
        if self._finished:
            return ""
        self._finished = True
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids[self._prefix_offset :]))

    def _emit(self, window_text: str) -> str:
        # A decode can be shorter than the emitted part only if a token decodes to nothing; then
        # there is nothing new yet.
        delta = window_text[len(self._prefix_text) :] if len(window_text) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if self._prefix_offset > _COMPACT_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        if delta:
            self._pieces.append(delta)
        return delta
