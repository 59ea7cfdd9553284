"""The backend channel: the scheduler's ROUTER, the DEALERs of workers (and encoders, kvstore).

To the scheduler: Register, Heartbeat, Deregister, RequestFinished, RequestHandoff, FlipAck,
KvEvent (a worker's HBM prefix blocks). To a worker: RegisterAck, Assign, AbortRequest,
FinishChoice, KvSnapshotRequest. (FinishChoice and the two KV index messages are declared with
the channel they also travel on: `frontend`, `kvstore`.)
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register
from common.protocol.sampling import Sampling

__all__ = [
    "BackendMessage",
    "BACKEND",
    "Register",
    "RegisterAck",
    "Heartbeat",
    "Deregister",
    "Assign",
    "AbortRequest",
    "RequestFinished",
    "RequestHandoff",
    "FlipAck",
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


@register
@BACKEND.carries(to="scheduler")
class Deregister(BackendMessage):
    TAG: ClassVar[str] = "deregister"
    instance_id: str


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
    # P/D disaggregation: decode workers to hand the KV to after prefill, best first, as
    # [instance_id, kv_addr] pairs. Empty: the assigned worker serves the whole request.
    decode_candidates: list[list[str]] = []


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
