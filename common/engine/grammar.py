"""Structured outputs: a request's structured spec -> a grammar -> a per-sequence token matcher.

The grammar engine is llguidance (pinned in requirements.txt). It was compared with xgrammar
0.2.8 (``python -m bench.structured --compare``; SmolLM2-135M tokenizer, 49152 tokens; a
7-property JSON schema with $ref, anyOf, enum, pattern, min/maxItems, additionalProperties=false;
a 69-token document), both in one run on the 2-core development box under load:

==========================  ==================  ==================
                            llguidance 1.9.1    xgrammar 0.2.8
==========================  ==================  ==================
tokenizer setup (once)      0.47 s              0.13 s
compile this schema         1.5 ms              283 ms
mask, 1 stream  / step      0.040 ms            0.007 ms
mask, 16 streams / step     0.53 ms             0.09 ms
unsupported keyword         clear error         silently ignored
extra dependencies          none                triton, apache-tvm-ffi
==========================  ==================  ==================

(On an idle 16-core host llguidance compiled it in 3-4 ms and filled masks in 0.04-0.06 ms for
1 stream, 0.20-0.24 ms for 16, per step; xgrammar was not importable there.)

Both handle $ref/$defs (recursive too), anyOf, oneOf, allOf, pattern, format, min/maxItems,
min/maxLength, minimum/maximum, exclusiveMinimum, multipleOf, additionalProperties (false or a
schema), prefixItems, const, enum, patternProperties. llguidance refuses ``uniqueItems``,
``not`` and ``if/then`` with "Unimplemented keys"; xgrammar accepted them without enforcing
them (an output could then break the schema the client asked for), and failed on a plain
``minProperties``. Why llguidance: every schema arrives with a request, so compile time is
paid per request (1.5 ms vs 283 ms, far more than both libraries' per-step mask cost, which
is below 1 ms for 16 streams next to a forward pass of tens of ms); it rejects what it cannot
enforce instead of producing output that breaks the schema; it takes Lark grammars natively
(and GBNF through its converter); and it brings no other dependency (xgrammar pulls triton).

Kinds (``SamplingParams.structured_kind``) and specs (``structured_spec``): ``json_object``
(None), ``json_schema`` (the schema as JSON text), ``regex``, ``choice`` (a JSON list of
strings), ``grammar`` (Lark, or GBNF/EBNF with ``::=`` rules). ``grammar_for`` turns one into a
validated llguidance grammar, cached by spec text (the gateway, the worker and the engine all
validate the same request; only the first pays). A :class:`GrammarState` follows one sequence:
it counts the output tokens it has consumed, so after a preemption (outputs kept), a P/D
hand-off (a fresh sequence given its outputs) :meth:`GrammarState.sync` replays whatever it
has not seen, and the matcher is where the original one was. A migrated continuation gets the
streamed outputs as the end of its prompt and ``structured_prefix_tokens`` saying how many:
:meth:`GrammarState.replay_prefix` consumes them first.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

logger = logging.getLogger(__name__)

__all__ = ["GrammarError", "grammar_for", "GrammarTokenizer", "GrammarState", "tokenizer_for_model"]

# No free whitespace between JSON tokens: a small model given the choice loops on newlines until
# max_tokens. A schema may still ask for it with "x-guidance": {"whitespace_flexible": true}.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_GRAMMAR_CACHE_SIZE = 512


class GrammarError(ValueError):
    """A structured spec that cannot be compiled (malformed, unsatisfiable or unsupported)."""


@functools.lru_cache(maxsize=_GRAMMAR_CACHE_SIZE)
def grammar_for(kind: str, spec: str | None) -> str:
    """The llguidance grammar of a structured spec, validated; GrammarError when impossible."""
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            # Lark string literals take JSON escapes, so json.dumps quotes any choice exactly.
            choices = json.loads(spec)
            grammar = llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice) for choice in choices)
            )
        elif kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec))
        else:
            raise GrammarError(f"unknown structured kind {kind!r}")
    except GrammarError:
        raise
    except Exception as exc:  # the converters raise ValueError (and others) on malformed input
        raise GrammarError(f"invalid {kind}: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"invalid {kind}: {error.strip()}")
    return grammar


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it (built once per model: about half a second)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance.hf

        # n_vocab is the logits width (can exceed the tokenizer's size: padded embeddings).
        self.vocab_size = max(vocab_size, len(hf_tokenizer))
        self.llg = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size,
                                                eos_token=sorted(eos_token_ids) or None)
        self._check_bytes(hf_tokenizer)

    def _check_bytes(self, hf_tokenizer: Any) -> None:
        # llguidance reads each token's bytes from the tokenizer's JSON; a conversion it
        # misreads (seen with a GGUF tokenizer converted by another transformers version) gives
        # masks that allow the wrong tokens. Say so loudly rather than emit broken structure.
        sample = hf_tokenizer.encode(' {"key": [1, 2.5], "b": "x y"}\n', add_special_tokens=False)
        for token in sample:
            ours, theirs = self.llg.decode_bytes([token]), hf_tokenizer.decode([token]).encode()
            if ours != theirs:
                logger.error("llguidance reads token %d as %r, the tokenizer as %r: structured outputs will "
                             "not follow their grammar with this tokenizer", token, ours, theirs)
                return

    def new_state(self, kind: str, spec: str | None) -> GrammarState:
        return GrammarState(llguidance.LLMatcher(self.llg, grammar_for(kind, spec), log_level=0))


_tokenizers: dict[tuple[str, int], GrammarTokenizer] = {}
_tokenizers_lock = threading.Lock()


def tokenizer_for_model(model_path: str, vocab_size: int, eos_token_ids: list[int]) -> GrammarTokenizer:
    """The cached GrammarTokenizer of a model (several engines in one process share it)."""
    key = (model_path, vocab_size)
    with _tokenizers_lock:
        found = _tokenizers.get(key)
        if found is None:
            from common.tokenizer import load_tokenizer

            found = _tokenizers[key] = GrammarTokenizer(load_tokenizer(model_path).hf, vocab_size, eos_token_ids)
        return found


class GrammarState:
    """The matcher of one sequence plus how many of its output tokens it has consumed."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0
        if matcher.is_error():
            logger.warning("grammar refused by the tokenizer: %s", matcher.get_error())

    def sync(self, output_ids: list[int]) -> None:
        """Consume the outputs not seen yet (all of them for a sequence rebuilt elsewhere)."""
        if self.num_consumed < len(output_ids):
            self.consume_many(output_ids[self.num_consumed:])

    def replay_prefix(self, token_ids: list[int]) -> None:
        """Consume tokens generated before this sequence began (they sit in its prompt)."""
        if token_ids and not self.matcher.consume_tokens(token_ids):
            logger.warning("replayed prefix left the grammar: %s", self.matcher.get_error())

    def consume(self, token_id: int) -> None:
        self.num_consumed += 1
        if not self.matcher.consume_token(token_id) and not self.matcher.is_stopped():
            logger.warning("token %d left the grammar: %s", token_id, self.matcher.get_error())

    def consume_many(self, token_ids: list[int]) -> None:
        self.num_consumed += len(token_ids)
        if not self.matcher.consume_tokens(token_ids):
            logger.warning("replayed tokens left the grammar: %s", self.matcher.get_error())

    def is_stopped(self) -> bool:
        """Nothing but EOS can follow: the grammar is complete (or the matcher failed)."""
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    def is_error(self) -> bool:
        return self.matcher.is_error()
