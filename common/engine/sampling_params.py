"""Sampling parameters of one request (OpenAI / vLLM names and defaults) and their validation.

`temperature == 0` means greedy. Stop strings are matched by the caller on detokenized text; the
sampler only sees token-level parameters. Parameters travel over the bus as `to_dict()` output.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy (dividing logits by them is numerically useless).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
# The kinds of structured output; `structured_spec` is the text each kind is compiled from.
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


class InvalidSamplingParameter(ValueError):
    """A sampling parameter that cannot be honoured; `param` names it (for OpenAI-style errors)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token + top-N
    skip_special_tokens: bool = True
    # Structured output (common.engine.grammar): one of STRUCTURED_KINDS, and its spec (a JSON
    # schema as JSON text, a regex, a JSON list of choice strings, or EBNF/Lark grammar text;
    # None for json_object).
    structured_kind: str | None = None
    structured_spec: str | None = None
    # A migrated continuation's prompt ends with the outputs streamed so far: the last this-many
    # prompt tokens were generated under the grammar, and its matcher replays them first.
    structured_prefix_tokens: int = 0
    # Beam search (common.engine.beam_search): `n` is the beam width and the request returns its
    # n best beams; scoring and stopping follow transformers' `generate(num_beams=n)`.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as transformers
    # Only these token ids may be generated (None: all); vLLM's `allowed_token_ids`.
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        # OpenAI accepts a single stop string; keep the canonical form a list
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)

    # ---- derived ------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `InvalidSamplingParameter` (a ValueError) naming the first impossible value."""
        self._check_int("n", self.n, minimum=1)
        self._check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidSamplingParameter("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        self._check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParameter("top_p", f"must be in (0, 1], got {self.top_p}")
        self._check_int("top_k", self.top_k, minimum=-1)
        self._check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParameter("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self._check_int("seed", self.seed, minimum=_SEED_MIN)
            if self.seed > _SEED_MAX:
                raise InvalidSamplingParameter("seed", f"must fit in 64 bits, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidSamplingParameter(name, f"must be in [-2, 2], got {value}")
        self._check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParameter(
                "repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, minimum=1)
        self._check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParameter(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if not isinstance(self.stop_token_ids, list):
            raise InvalidSamplingParameter("stop_token_ids", "must be a list of token ids")
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or token_id < 0:
                raise InvalidSamplingParameter("stop_token_ids", f"must hold non-negative ints, got {token_id!r}")
        if not isinstance(self.stop, list):
            raise InvalidSamplingParameter("stop", "must be a string or a list of strings")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidSamplingParameter("stop", f"must hold non-empty strings, got {stop!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParameter(name, f"must be a boolean, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            self._check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidSamplingParameter("logprobs", f"must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        self._check_structured()
        self._check_allowed_tokens()
        self._check_beam_search()

    def _check_allowed_tokens(self) -> None:
        allowed = self.allowed_token_ids
        if allowed is None:
            return
        if not isinstance(allowed, list) or not allowed:
            raise InvalidSamplingParameter("allowed_token_ids", "must be a non-empty list of token ids")
        for token_id in allowed:
            if not _is_int(token_id) or token_id < 0:
                raise InvalidSamplingParameter("allowed_token_ids", f"must hold non-negative ints, got {token_id!r}")

    def _check_beam_search(self) -> None:
        if not isinstance(self.use_beam_search, bool):
            raise InvalidSamplingParameter("use_beam_search", f"must be a boolean, got {self.use_beam_search!r}")
        self._check_float("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise InvalidSamplingParameter(
                "early_stopping", f"must be true, false or \"never\", got {self.early_stopping!r}")
        if not self.use_beam_search:
            return
        # Beam search is deterministic: it ranks by the model's own log-probabilities, so the
        # knobs that reshape or randomise a sampled distribution have nothing to act on.
        if not self.is_greedy:
            raise InvalidSamplingParameter(
                "temperature", f"beam search is deterministic: temperature must be 0, got {self.temperature}")
        unsupported = {
            "top_p": self.top_p != 1.0, "top_k": self.top_k > 0, "min_p": self.min_p != 0.0,
            "presence_penalty": self.presence_penalty != 0.0, "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0, "logprobs": self.logprobs is not None,
            "stop": bool(self.stop), "structured_kind": self.structured_kind is not None,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise InvalidSamplingParameter(name, "is not supported with beam search")
        if self.allowed_token_ids is not None and len(set(self.allowed_token_ids)) < self.n:
            raise InvalidSamplingParameter(
                "allowed_token_ids",
                f"beam search of width n={self.n} needs at least {self.n} distinct allowed tokens, "
                f"got {len(set(self.allowed_token_ids))}",
            )

    def _check_structured(self) -> None:
        # Shape only: compiling the spec against a tokenizer (common.engine.grammar) is what
        # rejects a malformed schema, regex or grammar; the gateway does it once per request.
        kind, spec = self.structured_kind, self.structured_spec
        self._check_int("structured_prefix_tokens", self.structured_prefix_tokens, minimum=0)
        if kind is None:
            if spec is not None:
                raise InvalidSamplingParameter("structured_spec", "given without structured_kind")
            return
        if kind not in STRUCTURED_KINDS:
            raise InvalidSamplingParameter(
                "structured_kind", f"must be one of {', '.join(STRUCTURED_KINDS)}, got {kind!r}"
            )
        if kind == "json_object":
            if spec is not None:
                raise InvalidSamplingParameter("structured_spec", "must be None for json_object")
            self._compile_structured()
            return
        if not isinstance(spec, str) or not spec:
            raise InvalidSamplingParameter("structured_spec", f"{kind} needs a non-empty string spec")
        if kind in ("json_schema", "choice"):
            try:
                parsed = json.loads(spec)
            except ValueError as exc:
                raise InvalidSamplingParameter("structured_spec", f"{kind} spec is not valid JSON: {exc}") from None
            if kind == "json_schema" and not isinstance(parsed, (dict, bool)):
                raise InvalidSamplingParameter("structured_spec", "a JSON schema must be an object")
            if kind == "choice" and (
                not isinstance(parsed, list) or not parsed
                or not all(isinstance(choice, str) and choice for choice in parsed)
            ):
                raise InvalidSamplingParameter("structured_spec", "choice needs a JSON list of non-empty strings")
        self._compile_structured()

    def _compile_structured(self) -> None:
        # Compiling rejects a malformed schema/regex/grammar; cached by spec text, so the worker's
        # and the engine's checks of a request the gateway already checked cost a dict lookup.
        from common.engine.grammar import GrammarError, grammar_for

        try:
            grammar_for(self.structured_kind, self.structured_spec)
        except GrammarError as exc:
            raise InvalidSamplingParameter("structured_spec", str(exc)) from None

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if not _is_int(value):
            raise InvalidSamplingParameter(name, f"must be an integer, got {value!r}")
        if value < minimum:
            raise InvalidSamplingParameter(name, f"must be >= {minimum}, got {value}")

    @staticmethod
    def _check_float(name: str, value: Any) -> None:
        if not _is_number(value):
            raise InvalidSamplingParameter(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidSamplingParameter(name, f"must be finite, got {value}")

    def resolved_max_tokens(self, prompt_len: int, max_model_len: int) -> int:
        """`max_tokens`, or what is left of the context window when it is None."""
        room = max_model_len - prompt_len
        if room < 1:
            raise InvalidSamplingParameter(
                "prompt", f"prompt has {prompt_len} tokens, the context window is {max_model_len} tokens; "
                "no room left to generate"
            )
        return room if self.max_tokens is None else self.max_tokens

    def validate_for_model(self, prompt_len: int, max_model_len: int, vocab_size: int) -> None:
        """`validate()` plus the limits of a concrete model and prompt."""
        self.validate()
        if prompt_len > max_model_len:
            raise InvalidSamplingParameter(
                "prompt", f"prompt has {prompt_len} tokens, longer than the context window ({max_model_len})"
            )
        max_tokens = self.resolved_max_tokens(prompt_len, max_model_len)
        if prompt_len + max_tokens > max_model_len:
            raise InvalidSamplingParameter(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context window "
                f"({max_model_len}); at most {max_model_len - prompt_len} tokens can be generated",
            )
        if self.structured_prefix_tokens > prompt_len:
            raise InvalidSamplingParameter(
                "structured_prefix_tokens", f"{self.structured_prefix_tokens} exceeds the prompt's {prompt_len} tokens"
            )
        if self.min_tokens > max_tokens:
            raise InvalidSamplingParameter(
                "min_tokens", f"min_tokens ({self.min_tokens}) exceeds the {max_tokens} tokens that fit"
            )
        for name in ("stop_token_ids", "allowed_token_ids"):
            for token_id in getattr(self, name) or ():
                if token_id >= vocab_size:
                    raise InvalidSamplingParameter(
                        name, f"token id {token_id} is outside the vocabulary (size {vocab_size})"
                    )

    # ---- wire form ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _copy_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Rebuild and validate params from `to_dict()` output; unknown keys are rejected."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling params must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        params = cls(**{key: _copy_value(value) for key, value in data.items()})
        params.validate()
        return params


def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def validate_prompt_ids(ids: list[int], vocab_size: int) -> None:
    """Reject an empty prompt or token ids the model does not have."""
    if not isinstance(ids, (list, tuple)) or len(ids) == 0:
        raise InvalidSamplingParameter("prompt", "prompt is empty: at least one token is needed")
    for position, token_id in enumerate(ids):
        if not _is_int(token_id) or not 0 <= token_id < vocab_size:
            raise InvalidSamplingParameter(
                "prompt", f"token {token_id!r} at position {position} is outside the vocabulary (size {vocab_size})"
            )
