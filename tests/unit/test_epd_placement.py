"""EPD placements: the profiler's choice, its file, and the scheduler's encoder pool (which
encoder gets a request's images, what happens when it fails or dies, what the router skips)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from common.protocol import ENCODE_ROLE, EncodeRequest, EncodeResult, ImageMeta, Register, Sampling, Submit
from services.scheduler.encode_pool import EncodePool
from services.scheduler.epd_placement import (
    E_P_D,
    ED_P,
    EP_D,
    EpdProfile,
    choose_placement,
    read_choice,
    write_choice,
)
from services.scheduler.registry import Registry
from services.scheduler.router import Router

# ---- the choice -------------------------------------------------------------------------


def _profile(**overrides) -> EpdProfile:
    values = dict(encode_s_per_image=0.02, images_per_request=1, prefill_s=0.05, decode_s=0.4,
                  transfer_s_per_image=0.001, prefill_workers=1, decode_workers=1, encoder_workers=1,
                  shared_compute=True)
    values.update(overrides)
    return EpdProfile(**values)


def test_shared_compute_keeps_encoding_in_the_prefill_worker() -> None:
    choice = choose_placement(_profile(encode_s_per_image=0.5))
    assert choice.placement == EP_D
    # Separating stages on shared cores only adds the transfer: never a better throughput.
    assert choice.predicted[EP_D]["busiest_stage_s_per_request"] < choice.predicted[E_P_D]["busiest_stage_s_per_request"]
    assert "ep-d chosen" in choice.reason and "ms" in choice.reason


def test_separate_devices_heavy_encode_and_busy_decode_pick_standalone_encoders() -> None:
    choice = choose_placement(_profile(encode_s_per_image=0.3, prefill_s=0.1, decode_s=0.3, shared_compute=False))
    # EP-D: prefill does 0.4 s; ED-P: decode does 0.6 s; E-P-D: the slowest stage is 0.3 s.
    assert choice.placement == E_P_D


def test_separate_devices_idle_decode_absorbs_the_encoder() -> None:
    # Decode has room for the encode (0.05 + 0.3 < prefill's 0.4 + 0.3 in EP-D) and E-P-D's lone
    # encoder would be the bottleneck at 0.3 s with 2 prefill/decode pairs: ED-P spreads it.
    choice = choose_placement(_profile(encode_s_per_image=0.3, prefill_s=0.2, decode_s=0.05, shared_compute=False,
                                       prefill_workers=2, decode_workers=2, encoder_workers=1))
    assert choice.placement == ED_P


def test_cheap_encode_on_separate_devices_stays_ep_d_by_the_tie_rule() -> None:
    choice = choose_placement(_profile(encode_s_per_image=0.0001, prefill_s=0.1, decode_s=1.0, shared_compute=False))
    assert choice.placement == EP_D  # all within 5 %: the lowest TTFT (no transfer) and the simplest


def test_negative_costs_are_refused() -> None:
    with pytest.raises(ValueError, match="encode_s_per_image"):
        choose_placement(_profile(encode_s_per_image=-1))


def test_choice_file_round_trip_and_clear_errors(tmp_path) -> None:
    path = tmp_path / "epd" / "m.json"
    choice = choose_placement(_profile())
    write_choice(path, choice, "/models/m")
    assert read_choice(path) == (choice.placement, choice.reason)
    body = json.loads(path.read_text())
    assert body["profile"]["encode_s_per_image"] == 0.02 and set(body["predicted"]) == {EP_D, ED_P, E_P_D}
    with pytest.raises(ValueError, match="xllm profile epd"):
        read_choice(tmp_path / "missing.json")
    path.write_text(json.dumps({"placement": "everywhere"}))
    with pytest.raises(ValueError, match="names no placement"):
        read_choice(path)


# ---- the encoder pool -------------------------------------------------------------------


def _register(registry: Registry, instance_id: str, role: str, colocated_with: str = "") -> None:
    registry.register(instance_id.encode(), Register(
        instance_id=instance_id, role=role, kv_addr="", num_pages=0 if role == ENCODE_ROLE else 64, page_size=16,
        model="m", max_model_len=0 if role == ENCODE_ROLE else 4096, colocated_with=colocated_with))


def _submit(request_id: str = "r1", kinds: tuple[str, ...] = ("pixels",)) -> tuple[Submit, list[torch.Tensor]]:
    images = [ImageMeta(content_hash=f"h{i}", grid_thw=[1, 4, 4], num_tokens=4, offset=1 + 6 * i, kind=kind)
              for i, kind in enumerate(kinds)]
    frames = [torch.full((16, 8), float(i)) if kind == "pixels" else torch.ones(4, 64) for i, kind in enumerate(kinds)]
    msg = Submit(request_id=request_id, prompt_ids=[1] * 20, sampling=Sampling(), gateway_id="gw",
                 tokens_addr="ipc:///t", arrival_time=0.0, images=images)
    return msg, frames


class _Harness:
    def __init__(self, placement: str, timeout_s: float = 30.0) -> None:
        self.now = 0.0
        self.registry = Registry(clock=lambda: self.now)
        self.sent: list[tuple[str, EncodeRequest, list[torch.Tensor]]] = []
        self.routed: list[tuple[Submit, list[torch.Tensor]]] = []

        async def send(encoder, msg, tensors):
            self.sent.append((encoder.instance_id, msg, tensors))

        async def route(identity, msg, tensors):
            self.routed.append((msg, tensors))

        self.pool = EncodePool(placement, self.registry, send, route, timeout_s=timeout_s, clock=lambda: self.now)

    def run(self, coro):
        return asyncio.run(coro)

    def answer(self, index: int = -1, error: str = "", rows: int = 4, sender: str | None = None) -> None:
        encoder_id, request, _ = self.sent[index]
        frames = [] if error else [torch.full((rows, 64), 7.0) for _ in request.images]
        result = EncodeResult(job_id=request.job_id, instance_id=encoder_id, error=error, cache_hits=0)
        self.run(self.pool.on_result((sender or encoder_id).encode(), result, frames))


def test_ep_d_and_text_requests_are_routed_at_once() -> None:
    h = _Harness(EP_D)
    _register(h.registry, "e0", ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit()))
    assert not h.sent and h.routed[0][0].images[0].kind == "pixels"
    h = _Harness(E_P_D)
    _register(h.registry, "e0", ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit(kinds=())))
    h.run(h.pool.submit(b"gw", *_submit("r2", kinds=("embeddings",))))
    assert not h.sent and len(h.routed) == 2


def test_e_p_d_encodes_then_routes_with_embeddings_in_place_of_pixels() -> None:
    h = _Harness(E_P_D)
    _register(h.registry, "e0", ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit(kinds=("pixels", "embeddings", "pixels"))))
    encoder_id, request, frames = h.sent[0]
    assert encoder_id == "e0" and [i.content_hash for i in request.images] == ["h0", "h2"]
    assert torch.equal(frames[1], torch.full((16, 8), 2.0))  # the third image's pixels
    assert not h.routed and h.pool.holds("r1")
    h.answer()
    msg, tensors = h.routed[0]
    assert [i.kind for i in msg.images] == ["embeddings"] * 3
    assert torch.equal(tensors[0], torch.full((4, 64), 7.0)) and torch.equal(tensors[1], torch.ones(4, 64))
    assert not h.pool.holds("r1") and h.pool.summary()["encoded_images"] == 2


def test_a_dead_encoders_job_goes_to_another_then_to_the_prefill_worker() -> None:
    h = _Harness(E_P_D)
    _register(h.registry, "e0", ENCODE_ROLE)
    _register(h.registry, "e1", ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit()))
    first = h.sent[0][0]
    dead = h.registry.get(first)
    h.registry.kill(dead, "test")
    h.run(h.pool.encoder_gone(dead))
    assert h.sent[1][0] != first and not h.routed
    # The first encoder's late answer (it was only slow) is not taken.
    h.answer(0, sender=first)
    assert not h.routed
    second = h.registry.get(h.sent[1][0])
    h.registry.kill(second, "test")
    h.run(h.pool.encoder_gone(second))
    msg, tensors = h.routed[0]
    assert msg.images[0].kind == "pixels" and torch.equal(tensors[0], torch.zeros(16, 8))
    assert h.pool.summary()["encode_fallbacks"] == 1 and h.pool.summary()["encode_retries"] == 1


def test_an_error_or_wrong_shape_is_retried_elsewhere_and_a_timeout_too() -> None:
    h = _Harness(E_P_D, timeout_s=5.0)
    for name in ("e0", "e1", "e2"):
        _register(h.registry, name, ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit()))
    h.answer(error="boom")
    h.answer(rows=3)  # 3 rows for a 4-token image
    assert len(h.sent) == 3 and len({s[0] for s in h.sent}) == 3 and not h.routed
    h.now = 6.0
    h.run(h.pool.expire())
    assert h.routed and h.routed[0][0].images[0].kind == "pixels"  # every encoder tried: the worker encodes


def test_no_encoder_at_all_routes_with_pixels_and_abort_forgets_the_job() -> None:
    h = _Harness(E_P_D)
    h.run(h.pool.submit(b"gw", *_submit()))
    assert h.routed and h.pool.summary()["encode_fallbacks"] == 0
    _register(h.registry, "e0", ENCODE_ROLE)
    h.run(h.pool.submit(b"gw", *_submit("r2")))
    h.run(h.pool.submit(b"gw", *_submit("r2")))  # the gateway resent it: one job
    assert len(h.sent) == 1
    assert h.pool.abort("r2") and not h.pool.abort("r2")
    h.answer()
    assert len(h.routed) == 1  # the aborted request is not routed


def test_ed_p_prefers_encoders_beside_a_live_worker_and_e_p_d_standalone_ones() -> None:
    for placement, expected in ((ED_P, "e-beside"), (E_P_D, "e-alone")):
        h = _Harness(placement)
        _register(h.registry, "decode-0", "decode")
        _register(h.registry, "e-alone", ENCODE_ROLE)
        _register(h.registry, "e-beside", ENCODE_ROLE, colocated_with="decode-0")
        _register(h.registry, "e-orphan", ENCODE_ROLE, colocated_with="decode-9")  # its worker is not here
        assert h.pool.candidates()[0].instance_id == expected
    h = _Harness(ED_P)
    _register(h.registry, "e-alone", ENCODE_ROLE)  # the preferred kind is missing: any encoder serves
    assert [i.instance_id for i in h.pool.candidates()] == ["e-alone"]


def test_the_router_never_routes_a_request_to_an_encoder() -> None:
    registry = Registry()
    _register(registry, "e0", ENCODE_ROLE)
    assert Router().route(registry.instances(), prompt_len=10) is None
    _register(registry, "worker-0", "mixed")
    route = Router().route(registry.instances(), prompt_len=10)
    assert route is not None and route.prefill.instance_id == "worker-0"
    assert registry.workers(1)["up"] == 1


def test_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="placement"):
        EncodePool("sideways", Registry(), None, None)  # type: ignore[arg-type]


# ---- xllm serve: resolving the placement, which encoders start ----------------------------


def _model_dir(tmp_path, multimodal: bool):
    path = tmp_path / ("vl" if multimodal else "text")
    path.mkdir()
    config = {"architectures": ["X"], **({"vision_config": {"depth": 1}} if multimodal else {})}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_serve_resolves_auto_from_the_profilers_file_and_refuses_what_cannot_run(tmp_path) -> None:
    from xllm.epd_serve import resolve_placement

    text, vl = _model_dir(tmp_path, False), _model_dir(tmp_path, True)
    assert resolve_placement("auto", None, text)[0] == EP_D  # nothing to encode, no profile needed
    assert resolve_placement("e-p-d", None, vl) == (E_P_D, "as asked")
    with pytest.raises(ValueError, match="needs a multimodal model"):
        resolve_placement("ed-p", None, text)
    with pytest.raises(ValueError, match="xllm profile epd"):
        resolve_placement("auto", str(tmp_path / "none.json"), vl)
    profile = tmp_path / "p.json"
    write_choice(profile, choose_placement(_profile(encode_s_per_image=0.3, prefill_s=0.1, decode_s=0.3,
                                                    shared_compute=False)), vl)
    placement, why = resolve_placement("auto", str(profile), vl)
    assert placement == E_P_D and str(profile) in why and "e-p-d chosen" in why


def test_serve_places_ed_p_encoders_beside_decode_workers_and_e_p_d_ones_alone() -> None:
    from xllm.epd_serve import encoder_argv, encoder_ids

    pd = [("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")]
    assert encoder_ids(ED_P, 3, pd) == [("encoder-0", "decode-0"), ("encoder-1", "decode-1"),
                                        ("encoder-2", "decode-0")]
    assert encoder_ids(ED_P, 1, [("worker-0", "mixed")]) == [("encoder-0", "worker-0")]
    assert encoder_ids(E_P_D, 2, pd) == [("encoder-0", ""), ("encoder-1", "")]
    assert encoder_ids(EP_D, 2, pd) == [] and encoder_ids(E_P_D, 0, pd) == []
    from common.engine.config import EngineConfig

    argv = encoder_argv("encoder-0", "decode-0", EngineConfig(model="/m", dtype="float32", max_num_seqs=3))
    assert argv[:4] == ["--instance-id", "encoder-0", "--colocated-with", "decode-0"]
    assert "--model" in argv and "--dtype" in argv and "--max-num-seqs" not in argv  # engine-only flags stay out
