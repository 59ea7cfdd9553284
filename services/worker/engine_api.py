"""What the worker process uses of its engine: the contract between `services.worker` (with its
role packages `services.prefill` and `services.decode`) and `common.engine.LLMEngine`.

Protocols, so they are structural: the engine satisfies them without naming them, and a test
may hand the worker any object with these members. The engine is not thread-safe: whatever
changes or walks its state runs on the worker's one engine thread. The event loop only reads the
fixed attributes (sizes, KV layout) and a few lookups whose answer may be stale without harm:
`has_unfinished`, `stats`, `handoff.is_held`, `store_hooks.prefix_hashes` (no state) and
`store_hooks.cached_prefix_pages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from common.engine.config import EngineConfig
    from common.engine.engine import EngineStats, SequenceOutput
    from common.engine.kv_transfer import KvEventHook, KvExport, OffloadHook
    from common.engine.multimodal import ImageItem
    from common.engine.sampling_params import SamplingParams
    from common.engine.sequence import Priority
    from common.engine.sequence import Sequence as EngineSequence

__all__ = ["WorkerEngine", "EngineHandoff", "EngineStoreHooks"]


@runtime_checkable
class EngineHandoff(Protocol):
    """`engine.handoff`: park a prefilled sequence and export its KV (prefill role); reserve pages
    and take a sequence's KV in (decode role)."""

    def is_held(self, request_id: str) -> bool: ...

    def export_kv(self, request_id: str) -> KvExport: ...

    def release_held(self, request_id: str) -> None: ...

    def resume_held(self, request_id: str) -> None: ...

    def hold_running(self, request_id: str) -> int: ...

    def reserve_transfer(
        self,
        request_id: str,
        prompt_ids: list[int],
        output_ids: list[int],
        params: SamplingParams | None = None,
        *,
        priority: str | Priority = ...,
        arrival_time: float | None = None,
        num_tokens: int,
        logprobs: list | None = None,
        num_cached_tokens: int = 0,
        generator_state: bytes | None = None,
        recompute: bool = False,
    ) -> list[int]: ...

    def write_kv_layers(self, request_id: str, layer_start: int, tensors: list[torch.Tensor]) -> None: ...

    def commit_transfer(self, request_id: str) -> None: ...

    def cancel_transfer(self, request_id: str) -> None: ...


@runtime_checkable
class EngineStoreHooks(Protocol):
    """`engine.store_hooks`: the HBM side of the tiered KV store (events, offload, reload)."""

    def set_kv_event_hook(self, fn: KvEventHook | None) -> None: ...

    def set_offload_hook(self, fn: OffloadHook | None) -> None: ...

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[bytes]: ...

    def cached_hashes(self) -> list[bytes]: ...

    def cached_prefix_pages(self, token_ids: Sequence[int]) -> int: ...

    def insert_cached_pages(
        self, token_ids: Sequence[int], start_page: int, payloads: Sequence[torch.Tensor | bytes]
    ) -> int: ...


@runtime_checkable
class WorkerEngine(Protocol):
    """The engine a worker hosts: requests in, `step()` out, its load and KV layout, and its parts."""

    config: EngineConfig
    model_path: str
    num_pages: int
    page_size: int
    max_model_len: int
    stats: EngineStats
    handoff: EngineHandoff
    store_hooks: EngineStoreHooks

    @property
    def kv_namespace(self) -> str: ...

    @property
    def kv_dtype(self) -> torch.dtype: ...

    @property
    def num_layers(self) -> int: ...

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        priority: str | Priority = ...,
        arrival_time: float | None = None,
        hold_after_prefill: bool = False,
        images: list[ImageItem] | None = None,
    ) -> list[EngineSequence]: ...

    def abort_request(self, request_id: str) -> bool: ...

    def finish_sequence(self, request_id: str, index: int, reason: str = "stop") -> None: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[SequenceOutput]: ...

    def load_stats(self) -> dict[str, Any]: ...

    def check_integrity(self) -> None: ...
