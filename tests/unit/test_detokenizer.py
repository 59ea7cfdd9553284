"""Incremental detokenizer: streamed text must equal the full decode, never split a character."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from common.detokenizer import MAX_HELD_TOKENS, REPLACEMENT_CHAR, IncrementalDetokenizer
from common.tokenizer import Tokenizer, default_model_path, load_tokenizer

TEXTS = [
    "Hello, world! Plain ASCII text.",
    "Café crème brûlée, naïve façade — ¿qué tal? Ελληνικά",
    "中文测试：你好，世界！日本語のテキスト。한국어",
    "Emoji 😀🎉👩‍👩‍👧‍👦🇫🇷 mixed with text 🤖 end",
    "  leading spaces\n\nnew lines\ttabs  ",
    "\ufffd literal replacement char \ufffd",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> Tokenizer:
    """A tiny Llama-style SentencePiece BPE: `<0xNN>` byte-fallback tokens, `▁` spaces, a BOS."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "▁a", "▁b", "ab", "▁ab", "h", "i", "hi", "▁hi", "é", "▁é"]:
        vocab[piece] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"),
                                                       ("h", "i"), ("▁", "hi"), ("▁", "é")],
                                  unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = None
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer(hf, chat_template=None, name="byte-fallback-test")


def stream(tokenizer, ids: list[int], chunk_sizes: list[int] | None = None, **kwargs) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = []
    position = 0
    rng = random.Random(len(ids))
    while position < len(ids):
        size = chunk_sizes[len(pieces) % len(chunk_sizes)] if chunk_sizes else rng.randint(1, 3)
        pieces.append(detok.push(ids[position : position + size]))
        position += size
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return "".join(pieces), pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [[1], [2], [1, 3, 2]])
def test_stream_equals_full_decode(tokenizer: Tokenizer, text: str, chunk: list[int]) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    streamed, pieces = stream(tokenizer, ids, chunk)
    assert streamed == tokenizer.decode(ids) == text
    # no delta ever carries half a character (the literal U+FFFD text is the only allowed one)
    if REPLACEMENT_CHAR not in text:
        assert all(REPLACEMENT_CHAR not in piece for piece in pieces)


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji's 4 bytes over several tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([token]) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "😀"


def test_random_token_sequences(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
        streamed, _ = stream(tokenizer, ids)
        assert streamed == tokenizer.decode(ids)


def test_random_byte_heavy_sequences(tokenizer: Tokenizer) -> None:
    """Ids of the byte-level pieces of multi-byte text, shuffled: lots of broken UTF-8."""
    pool = sorted({i for text in TEXTS[1:4] for i in tokenizer.encode(text, add_special_tokens=False)})
    rng = random.Random(99)
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        streamed, _ = stream(tokenizer, ids)
        assert streamed == tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_stream(tokenizer: Tokenizer, skip: bool) -> None:
    ids = [1] + tokenizer.encode("Hi 😀", add_special_tokens=False) + [2, 5] + tokenizer.encode(" there")
    streamed, _ = stream(tokenizer, ids, [1], skip_special_tokens=skip)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in streamed) is (not skip)


def test_prompt_context_gives_continuation_text(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    output = tokenizer.encode(" Paris, naturellement. 🗼", add_special_tokens=False)
    streamed, _ = stream(tokenizer, output, [1], prompt_ids=prompt)
    full = tokenizer.decode(prompt + output)
    assert streamed == full[len(tokenizer.decode(prompt)) :] == " Paris, naturellement. 🗼"


@pytest.mark.parametrize("text", ["ab a b", "hi é😀 ab", "€ 中 hi", "é\U0001f600\U0001f600a"])
def test_byte_fallback_tokens(byte_fallback_tokenizer: Tokenizer, text: str) -> None:
    ids = byte_fallback_tokenizer.encode(text, add_special_tokens=False)
    tokens = byte_fallback_tokenizer.convert_ids_to_tokens(ids)
    if any(ord(ch) > 0xFF for ch in text):
        assert any(token.startswith("<0x") for token in tokens)
    for chunk in ([1], [2], [3, 1]):
        streamed, pieces = stream(byte_fallback_tokenizer, ids, chunk)
        assert streamed == byte_fallback_tokenizer.decode(ids) == text
        assert all(REPLACEMENT_CHAR not in piece for piece in pieces)


def test_byte_fallback_run_is_emitted_when_the_run_ends(byte_fallback_tokenizer: Tokenizer) -> None:
    ids = byte_fallback_tokenizer.encode("ab😀é", add_special_tokens=False)
    tokens = byte_fallback_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["▁ab", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "é"]
    detok = IncrementalDetokenizer(byte_fallback_tokenizer)
    deltas = [detok.push([token]) for token in ids]
    assert deltas == ["ab", "", "", "", "", "😀é"]
    assert detok.flush() == ""


def test_byte_fallback_random_sequences_with_specials(byte_fallback_tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    vocab = byte_fallback_tokenizer.vocab_size
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            streamed, _ = stream(byte_fallback_tokenizer, ids, skip_special_tokens=skip)
            assert streamed == byte_fallback_tokenizer.decode(ids, skip_special_tokens=skip)


def test_leading_space_after_skipped_special_token(byte_fallback_tokenizer: Tokenizer) -> None:
    # SentencePiece decoders strip the first token's leading space; a skipped </s> in the middle
    # must not make the next word look like the start of the text
    ids = byte_fallback_tokenizer.encode("ab", add_special_tokens=False)
    ids += [2] + byte_fallback_tokenizer.encode("hi", add_special_tokens=False)
    streamed, _ = stream(byte_fallback_tokenizer, ids, [1])
    assert streamed == byte_fallback_tokenizer.decode(ids) == "ab hi"


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode() call."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.byte_fallback_ids = inner.byte_fallback_ids
        self.decode_lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_bounded(tokenizer: Tokenizer) -> None:
    text = " ".join(TEXTS) * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    counting = CountingTokenizer(tokenizer)
    streamed, _ = stream(counting, ids, [1])
    assert streamed == text
    assert max(counting.decode_lengths) <= 8
    assert len(counting.decode_lengths) <= 2 * len(ids) + 2


def test_genuine_replacement_chars_are_not_held_forever(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(REPLACEMENT_CHAR * 200, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    emitted_before_flush = "".join(detok.push([token]) for token in ids)
    assert len(emitted_before_flush) >= 200 - MAX_HELD_TOKENS
    assert emitted_before_flush + detok.flush() == tokenizer.decode(ids)


def test_push_after_flush_is_an_error(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    detok.push(tokenizer.encode("hi", add_special_tokens=False))
    assert detok.flush() == "" and detok.text == "hi"
    with pytest.raises(RuntimeError):
        detok.push([100])
