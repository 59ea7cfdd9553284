"""The scheduler's routing policy: least loaded by (waiting + running) / capacity, free pages next."""

from __future__ import annotations

from collections.abc import Iterable

from services.scheduler.registry import Instance
from services.scheduler.router import Router


def make(instance_id: str, *, waiting: int = 0, running: int = 0, free: int = 100, capacity: int = 8,
         inflight: int = 0, assigned: int = 0, max_model_len: int = 2048, draining: bool = False) -> Instance:
    inst = Instance(instance_id=instance_id, identity=instance_id.encode(), role="decode", kv_addr="",
                    num_pages=100, page_size=16, model="m", max_model_len=max_model_len, registered_at=0.0,
                    last_heartbeat=0.0, waiting=waiting, running=running, free_pages=free, total_pages=100,
                    max_num_seqs=capacity, draining=draining)
    inst.inflight = {f"{instance_id}-r{i}" for i in range(inflight)}
    inst.assigned_total = assigned
    return inst


def whole(instances: Iterable[Instance], prompt_len: int = 0, router: Router | None = None) -> Instance | None:
    """Who `Router.route` gives a request to serve whole (one pool: no prefill/decode split)."""
    route = (router or Router()).route(instances, prompt_len)
    if route is None:
        return None
    assert route.decode == []
    return route.prefill


def test_no_instances_no_route() -> None:
    assert whole([]) is None
    assert whole([make("a", draining=True)]) is None


def test_least_loaded_relative_to_capacity() -> None:
    # b has more sequences but twice the capacity: 3/8 < 2/4.
    a = make("a", running=2, capacity=4)
    b = make("b", running=3, capacity=8)
    assert whole([a, b]) is b


def test_waiting_counts_as_load() -> None:
    a = make("a", waiting=3)
    b = make("b", running=1)
    assert whole([a, b]) is b


def test_free_pages_break_ties() -> None:
    a = make("a", running=1, free=10)
    b = make("b", running=1, free=90)
    assert whole([a, b]) is b


def test_idle_equals_alternate_by_assignments() -> None:
    a, b = make("a"), make("b")
    router = Router()
    picks = []
    for _ in range(4):
        chosen = whole([a, b], router=router)
        chosen.assigned_total += 1
        picks.append(chosen.instance_id)
    assert picks == ["a", "b", "a", "b"]


def test_inflight_between_heartbeats_spreads_a_burst() -> None:
    # Both report idle, but the scheduler already gave `a` two requests since its last heartbeat.
    a = make("a", inflight=2)
    b = make("b")
    assert whole([a, b]) is b


def test_draining_instance_is_skipped() -> None:
    a = make("a", draining=True)
    b = make("b", running=7)
    assert whole([a, b]) is b


def test_prompt_longer_than_a_context_prefers_one_that_fits() -> None:
    small = make("small", max_model_len=512)
    large = make("large", running=5, max_model_len=4096)
    assert whole([small, large], prompt_len=1000) is large
    # Nobody fits: still routed, the worker answers with a clear 400.
    assert whole([small], prompt_len=1000) is small


# ---------------------------------------------------------------- P/D routing (Router.route)


def pd(instance_id: str, role: str, *, queued: int = 0, **kwargs) -> Instance:
    inst = make(instance_id, **kwargs)
    inst.role = role
    inst.reported_queued_prefill_tokens = queued
    return inst


def test_route_pairs_the_least_queued_prefill_with_ranked_decode_candidates() -> None:
    p1, p2 = pd("p1", "prefill", queued=500), pd("p2", "prefill", queued=20)
    d1 = pd("d1", "decode", running=6)
    d2 = pd("d2", "decode", running=1)
    d3 = pd("d3", "decode", running=1, free=1)  # one free page cannot hold a 100-token prompt
    route = Router().route([p1, p2, d1, d2, d3], prompt_len=100)
    assert route.prefill is p2
    assert [d.instance_id for d in route.decode] == ["d2", "d1", "d3"]


def test_route_counts_prompts_sent_since_the_last_heartbeat() -> None:
    p1, p2 = pd("p1", "prefill", queued=100), pd("p2", "prefill", queued=50)
    p2.prefill_tokens_since_heartbeat = 400  # a burst went to p2 since its last report
    assert Router().route([p1, p2, pd("d", "decode")], prompt_len=10).prefill is p1


def test_route_serves_whole_when_a_pool_is_empty_or_n_is_above_one() -> None:
    p, d = pd("p", "prefill"), pd("d", "decode", running=3)
    assert Router().route([p], prompt_len=10).decode == []
    assert Router().route([d], prompt_len=10).prefill is d
    route = Router().route([p, d], prompt_len=10, n=2)
    assert route.decode == [] and route.prefill is p  # least loaded serves it whole


def test_route_prefers_an_idler_mixed_worker() -> None:
    p, d, m = pd("p", "prefill", running=4), pd("d", "decode"), pd("m", "mixed")
    route = Router().route([p, d, m], prompt_len=10)
    assert route.prefill is m and route.decode == []
    m.running = 8
    assert Router().route([p, d, m], prompt_len=10).prefill is p


def test_route_skips_draining_instances() -> None:
    p, d = pd("p", "prefill"), pd("d", "decode", draining=True)
    route = Router().route([p, d], prompt_len=10)
    assert route.prefill is p and route.decode == []
    assert Router().route([pd("x", "decode", draining=True)]) is None


# ------------------------------------------------------------- KV-aware routing (cached tokens)


def test_a_repeated_long_prefix_goes_to_the_worker_that_holds_it() -> None:
    a, b = pd("a", "mixed", running=1), pd("b", "mixed")
    # `a` is a little busier but holds 900 of the prompt's 1000 tokens.
    route = Router().route([a, b], prompt_len=1000, cached={"a": 900, "b": 0})
    assert route.prefill is a
    # Without the index, load alone decides.
    assert Router().route([a, b], prompt_len=1000).prefill is b


def test_load_still_spreads_when_every_worker_holds_the_prefix() -> None:
    a, b = pd("a", "mixed"), pd("b", "mixed")
    cached = {"a": 900, "b": 900}
    picks = []
    for _ in range(6):
        chosen = Router().route([a, b], prompt_len=1000, cached=cached).prefill
        chosen.inflight.add(f"r{len(picks)}")  # what the scheduler does on assign
        picks.append(chosen.instance_id)
    assert picks.count("a") == 3 and picks.count("b") == 3


def test_a_busy_holder_loses_to_an_idle_worker_once_its_queue_outweighs_the_saving() -> None:
    holder, idle = pd("holder", "mixed", queued=2000), pd("idle", "mixed")
    assert Router().route([holder, idle], prompt_len=1000, cached={"holder": 900}).prefill is idle


def test_kv_aware_prefill_choice_in_pd_mode() -> None:
    p1, p2, d = pd("p1", "prefill"), pd("p2", "prefill", queued=100), pd("d", "decode")
    route = Router().route([p1, p2, d], prompt_len=1000, cached={"p2": 960})
    assert route.prefill is p2 and route.decode == [d]


# ------------------------------------------------------------ role flips: no stale candidates


def flipping(inst: Instance, to: str, flip_id: int = 1) -> Instance:
    """`inst` ordered into `to` and not acknowledged yet (what RoleFlips.order leaves)."""
    inst.pending_role, inst.pending_flip = to, flip_id
    return inst


def test_an_instance_ordered_out_of_decode_is_no_longer_a_candidate() -> None:
    p = pd("p", "prefill", queued=10)
    d0, d1 = pd("d0", "decode"), pd("d1", "decode", running=3)
    flipping(d0, "prefill")
    route = Router().route([p, d0, d1], prompt_len=10)
    # Not a decode candidate (it would refuse once flipped), not a prefill target either (yet).
    assert route.prefill is p and route.decode == [d1]
    # Idle, yet not given prefill work either while the worker has not acknowledged the flip.
    busy = pd("busy", "prefill", queued=900)
    assert Router().route([busy, d0, d1], prompt_len=10).prefill is busy


def test_the_new_role_is_offered_once_acknowledged_with_the_flip_generation() -> None:
    p = pd("p", "prefill", queued=500)
    d0, d1 = pd("d0", "decode"), pd("d1", "decode")
    flipping(d0, "prefill", flip_id=3)
    assert Router().route([p, d0, d1], prompt_len=10).prefill is p
    d0.acknowledge(3, "prefill")
    route = Router().route([p, d0, d1], prompt_len=10)
    assert route.prefill is d0 and route.decode == [d1]  # d0 prefills now: less queued than p
    # And back: named as a decode candidate again only after that flip is acknowledged too; the
    # candidate carries the generation the worker acknowledged.
    flipping(d0, "decode", flip_id=5)
    assert d0 not in Router().route([p, d0, d1], prompt_len=10).decode
    d0.acknowledge(5, "decode")
    route = Router().route([p, d0, d1], prompt_len=10)
    assert d0 in route.decode and d0.flip_id == 5


def test_a_one_pool_layout_mid_flip_serves_whole_on_the_settled_side() -> None:
    # 1P + 1D, the decode worker ordered to prefill: no decode candidate is left, so requests go
    # whole to the prefill worker rather than name the flipping one.
    p, d = pd("p", "prefill"), flipping(pd("d", "decode"), "prefill")
    route = Router().route([p, d], prompt_len=10)
    assert route.prefill is p and route.decode == []


def test_when_every_instance_is_mid_flip_a_request_still_gets_one() -> None:
    a, b = flipping(pd("a", "decode"), "prefill"), flipping(pd("b", "prefill", running=2), "decode")
    route = Router().route([a, b], prompt_len=10)
    assert route is not None and route.prefill is a and route.decode == []  # never a 503 while one lives
    # Still never a draining one, and a context window that fits still comes first.
    b.draining = True
    assert Router().route([a, b], prompt_len=10).prefill is a
    a.draining = True
    assert Router().route([a, b], prompt_len=10) is None
    small, large = flipping(pd("small", "mixed", max_model_len=64), "prefill"), pd("large", "mixed", running=5)
    flipping(large, "decode")
    assert Router().route([small, large], prompt_len=100).prefill is large


def test_an_idle_prefill_instance_decodes_offline_work_itself() -> None:
    p, d = pd("p", "prefill"), pd("d", "decode")
    assert Router().route([p, d], prompt_len=50, priority="offline").decode == []  # whole, on p
    assert Router().route([p, d], prompt_len=50, priority="online").decode == [d]  # online: P/D as usual
    busy = pd("p", "prefill", queued=200)  # online prompts queued there: no offline decode beside them
    assert Router().route([busy, d], prompt_len=50, priority="offline").decode == [d]
    full = pd("p", "prefill", running=4)  # half its batch already runs: the decode pool takes it
    assert Router().route([full, d], prompt_len=50, priority="offline").decode == [d]
