"""Token logprobs from the wire -> OpenAI's chat and completions logprobs shapes.

Only requests that ask for logprobs pay for this. Token text/bytes are cached per token id, so a
token is looked up in the tokenizer once per process, not once per use.

Wire form of one generated token's logprobs (TokenDelta.logprobs[i]), as the worker sends the
engine's `TokenLogprobs(token_id, logprob, rank, top)`: either a list
`[token_id, logprob, rank, [[id, logprob], ...]]` or a dict with those keys; both are accepted.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from common.tokenizer import Tokenizer

# OpenAI's floor for "impossible" tokens; -inf is not JSON.
MIN_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of each byte, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Token id -> (display text, UTF-8 bytes), cached."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer.hf, "backend_tokenizer", None), "decoder", None)
        self._byte_level = "ByteLevel" in str(decoder)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            entry = self._cache[token_id] = self._lookup(token_id)
        return entry

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0]
        if piece is None:
            return "", []
        raw: bytes | None = None
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
        else:
            match = _BYTE_TOKEN.fullmatch(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece's word marker
        if raw is None:
            raw = piece.encode("utf-8")  # added tokens outside the byte map: their literal text
        # a token holding part of a UTF-8 character shows as U+FFFD; its bytes stay exact
        return raw.decode("utf-8", errors="replace"), list(raw)


def _clean(logprob: Any) -> float:
    value = float(logprob)
    return value if math.isfinite(value) and value > MIN_LOGPROB else MIN_LOGPROB


def unpack(entry: Any) -> tuple[int, float, list[tuple[int, float]]]:
    """(token_id, logprob, [(id, logprob), ...]) from one wire entry."""
    if isinstance(entry, dict):
        token_id, logprob, top = entry.get("token_id"), entry.get("logprob"), entry.get("top") or []
    else:
        token_id, logprob = entry[0], entry[1]
        top = entry[3] if len(entry) > 3 else (entry[2] if len(entry) > 2 and isinstance(entry[2], list) else [])
    pairs: list[tuple[int, float]] = []
    if isinstance(top, dict):
        pairs = [(int(k), _clean(v)) for k, v in top.items()]
    else:
        for item in top:
            if isinstance(item, dict):
                pairs.append((int(item["token_id"]), _clean(item["logprob"])))
            else:
                pairs.append((int(item[0]), _clean(item[1])))
    return int(token_id), _clean(logprob), pairs


def chat_entries(texts: TokenTexts, entries: list[Any], top_n: int) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` items for the given tokens."""
    out = []
    for entry in entries:
        token_id, logprob, top = unpack(entry)
        text, raw = texts.get(token_id)
        tops = []
        for tid, tlp in top[:top_n]:
            ttext, traw = texts.get(tid)
            tops.append({"token": ttext, "logprob": tlp, "bytes": traw})
        out.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": tops})
    return out


class CompletionLogprobs:
    """Builds completions-style logprobs, tracking each token's offset in the choice's text."""

    __slots__ = ("texts", "top_n", "offset")

    def __init__(self, texts: TokenTexts, top_n: int) -> None:
        self.texts = texts
        self.top_n = top_n
        self.offset = 0

    def block(self, entries: list[Any]) -> dict[str, list]:
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        text_offset: list[int] = []
        for entry in entries:
            token_id, logprob, top = unpack(entry)
            text, _ = self.texts.get(token_id)
            tokens.append(text)
            token_logprobs.append(logprob)
            tops = {self.texts.get(tid)[0]: tlp for tid, tlp in top[: self.top_n]}
            tops.setdefault(text, logprob)  # like vLLM: the sampled token is always listed
            top_logprobs.append(tops)
            text_offset.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


def merge_completion_blocks(blocks: list[dict[str, list]]) -> dict[str, list]:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for block in blocks:
        for key, values in block.items():
            merged[key].extend(values)
    return merged
