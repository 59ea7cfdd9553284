"""The sampling parameters of a request as they travel on the bus (Submit, Assign, KV hand-off).

A typed record, so a misspelt or mistyped parameter fails at decode, where the message came in,
instead of deep in a worker. It mirrors `common.engine.sampling_params.SamplingParams` field for
field with the same defaults (a unit test holds the two together); the protocol does not import
the engine, so the edges convert: the gateway builds it from validated SamplingParams, a worker
turns it back into SamplingParams (`SamplingParams.from_dict(record.to_dict())`, which validates
the values as well).
"""

from __future__ import annotations

from typing import Any

from common.protocol.base import Record

__all__ = ["Sampling"]


class Sampling(Record):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    stop: list[str] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_kind: str | None = None
    structured_spec: str | None = None
    structured_prefix_tokens: int = 0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    allowed_token_ids: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value (lists copied), the form `SamplingParams.from_dict` takes."""
        return {name: list(value) if isinstance(value, list) else value
                for name in self.__struct_fields__ for value in (getattr(self, name),)}
