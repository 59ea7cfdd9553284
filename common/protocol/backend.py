"""The backend channel: the scheduler's ROUTER, the DEALERs of workers (and encoders, kvstore).

To the scheduler: Register, Heartbeat, Deregister, RequestFinished, RequestHandoff, FlipAck,
MigrationResult, KvEvent (a worker's HBM prefix blocks). To a worker: RegisterAck, Assign,
AbortRequest, MigrateRequest, FinishChoice, KvSnapshotRequest. (FinishChoice and the two KV index messages are declared with
the channel they also travel on: `frontend`, `kvstore`.)
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, Record, register
from common.protocol.embedding import EmbedTask
from common.protocol.image import ImageMeta
from common.protocol.sampling import Sampling

__all__ = [
    "BackendMessage",
    "BACKEND",
    "Register",
    "RegisterAck",
    "Heartbeat",
    "Deregister",
    "Assign",
    "DecodeCandidate",
    "AbortRequest",
    "RequestFinished",
    "RequestHandoff",
    "FlipAck",
    "MigrateRequest",
    "MigrationResult",
]


class BackendMessage(Message):
    """A message on the backend channel."""


BACKEND = Channel("backend", BackendMessage, binder="scheduler", connector="worker")


@register
@BACKEND.carries(to="scheduler")
class Register(BackendMessage):
    TAG: ClassVar[str] = "register"
    instance_id: str
    role: str
    kv_addr: str
    num_pages: int
    page_size: int
    model: str
    max_model_len: int
    # The last role flip this worker applied (0: none): a restarted scheduler numbers its next
    # flips above it, so a worker's flip ids only grow (decode candidates are judged by them).
    flip_id: int = 0
    # A random token chosen at process start: a worker back under the same id with another
    # incarnation is a new instance, and the old one's requests are not its own.
    incarnation: str = ""
    pid: int = 0  # lets the scheduler tell which ipc:// peer a socket disconnect was (liveness)
    # An encoder (role `encode`) sharing a device with this worker (ED-P); empty: standalone.
    colocated_with: str = ""


@register
@BACKEND.carries(to="worker")
class RegisterAck(BackendMessage):
    TAG: ClassVar[str] = "register_ack"
    instance_id: str
    accepted: bool
    reason: str = ""


@register
@BACKEND.carries(to="scheduler")
class Heartbeat(BackendMessage):
    """A worker's load, every heartbeat interval and whenever a request ends there.

    The typed fields are everything the scheduler routes, flips and indexes on; `stats` is the
    worker's full free-form report, for display only (status page, /metrics): nothing may decide
    on it.
    """

    TAG: ClassVar[str] = "heartbeat"
    instance_id: str
    role: str
    waiting: int
    running: int
    free_pages: int
    total_pages: int
    used_pages: int
    prefix_hit_rate: float
    queued_prefill_tokens: int  # prompt tokens admitted and not prefilled yet
    max_num_seqs: int  # sequences the engine runs at once (0: not known yet)
    draining: bool
    flipping: bool  # flipped, and no work of the new role arrived yet
    kv_namespace: str  # model | kv dtype | page size: what its prefix hashes are computed in
    prompt_tokens_total: int
    generated_tokens_total: int
    stats: dict
    # The last role flip this worker applied (0: none): `role` is its answer to that order, so
    # a heartbeat sent before the worker saw a newer order cannot be taken for its answer.
    flip_id: int = 0
    incarnation: str = ""  # as in Register


@register
@BACKEND.carries(to="scheduler")
class Deregister(BackendMessage):
    TAG: ClassVar[str] = "deregister"
    instance_id: str


class DecodeCandidate(Record):
    """A decode worker a prefill worker may hand a sequence's KV to, as the scheduler named it."""

    instance_id: str
    kv_addr: str
    # The worker's flip generation (the id of the last role flip it acknowledged) when it was
    # named: a promise made then is kept even if the worker flipped out of the decode role since.
    flip_id: int = 0


@register
@BACKEND.carries(to="worker")
class Assign(BackendMessage):
    TAG: ClassVar[str] = "assign"
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    priority: str
    gateway_id: str
    tokens_addr: str
    prefill_instance: str
    decode_instance: str
    arrival_time: float
    # P/D disaggregation: decode workers to hand the KV to after prefill, best first. Empty: the
    # assigned worker serves the whole request.
    decode_candidates: list[DecodeCandidate] = []
    # Set: an embedding request (the worker pools a prefill-only forward; no decode, no hand-off).
    embed: EmbedTask | None = None
    # A multimodal request's images, each with one raw tensor frame in this order (common.image_frames).
    images: list[ImageMeta] = []


@register
@BACKEND.carries(to="worker")
class AbortRequest(BackendMessage):
    TAG: ClassVar[str] = "abort_request"
    request_id: str


@register
@BACKEND.carries(to="scheduler")
class RequestFinished(BackendMessage):
    TAG: ClassVar[str] = "request_finished"
    request_id: str
    instance_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    # Latency as the serving worker saw it (-1 when unknown): feeds the dynamic PD policy.
    ttft_s: float = -1.0
    tpot_s: float = -1.0


@register
@BACKEND.carries(to="scheduler")
class RequestHandoff(BackendMessage):
    """A decode worker took a request over from its prefill worker (the KV landed): from now on
    aborts go to `to_instance` and its RequestFinished ends the request."""

    TAG: ClassVar[str] = "request_handoff"
    request_id: str
    from_instance: str
    to_instance: str
    ttft_s: float = -1.0


@register
@BACKEND.carries(to="scheduler")
class FlipAck(BackendMessage):
    """A worker applied a RoleFlip (from the control channel); it answers on the backend."""

    TAG: ClassVar[str] = "flip_ack"
    instance_id: str
    flip_id: int
    role: str


@register
@BACKEND.carries(to="worker")
class MigrateRequest(BackendMessage):
    """DP load balance: move a running decode sequence to `target_instance` (its KV over the
    target's kv socket, or recomputed there when it holds fewer than `recompute_below_tokens`).

    Sent on the backend, not the control PUB, so it is ordered with the request's Assign and
    AbortRequest. The source answers with MigrationResult; the target, once it owns the
    sequence, with RequestHandoff (as after a P/D hand-off)."""

    TAG: ClassVar[str] = "migrate_request"
    migration_id: int
    request_id: str
    target_instance: str
    target_kv_addr: str
    target_flip_id: int = 0
    recompute_below_tokens: int = 0


@register
@BACKEND.carries(to="scheduler")
class MigrationResult(BackendMessage):
    """The source's answer to a MigrateRequest: moved (`mode` "kv" or "recompute") or not (the
    sequence keeps running on the source, or it had ended / was not in its decode phase)."""

    TAG: ClassVar[str] = "migration_result"
    migration_id: int
    request_id: str
    from_instance: str
    to_instance: str
    ok: bool
    mode: str = ""
    reason: str = ""
    num_tokens: int = 0  # tokens whose KV moved (or the target recomputes)
