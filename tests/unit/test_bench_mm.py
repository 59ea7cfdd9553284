"""`xllm bench mm`'s workload and summary (the servers it starts are exercised by running it)."""

from __future__ import annotations

from bench.client import RequestResult
from bench.mm import make_workload, summarize


def _urls(workload: list[list[dict]]) -> list[str]:
    return [p["image_url"]["url"] for messages in workload for p in messages[0]["content"]
            if p["type"] == "image_url"]


def test_workload_is_seeded_and_repeats_about_the_asked_share() -> None:
    workload = make_workload(40, 2, 0.5, 56, 56, seed=3)
    assert workload == make_workload(40, 2, 0.5, 56, 56, seed=3)
    urls = _urls(workload)
    assert len(urls) == 80 and all(u.startswith("data:image/png;base64,") for u in urls)
    repeats = len(urls) - len(set(urls))
    assert 20 <= repeats <= 60  # about half of the images were sent before
    assert len(set(_urls(make_workload(10, 1, 0.0, 56, 56, seed=3)))) == 10  # no repeats asked: none


def test_summary_takes_the_encoder_pools_deltas() -> None:
    results = [RequestResult(ok=True, output_tokens=4, ttft=0.1, e2e=0.5), RequestResult(ok=True, output_tokens=4,
               ttft=0.3, e2e=0.7), RequestResult(ok=False, error="HTTP 400: bad image")]
    before = {"encoded_requests": 1, "encoded_images": 1, "encoder_cache_hits": 0, "encode_retries": 0,
              "encode_fallbacks": 0}
    after = {"encoded_requests": 3, "encoded_images": 5, "encoder_cache_hits": 2, "encode_retries": 1,
             "encode_fallbacks": 0, "encoders": 2}
    s = summarize(results, 2.0, before, after)
    assert (s["requests"], s["completed"]) == (3, 2) and s["errors"]
    assert s["encoded_images"] == 4 and s["embedding_cache_hit_rate"] == 0.5 and s["encode_retries"] == 1
    assert s["requests_per_s"] == 1.0 and s["output_tok_per_s"] == 4.0
    assert abs(s["ttft_ms"]["mean"] - 200.0) < 1e-9
    assert summarize(results, 2.0, before, before)["embedding_cache_hit_rate"] is None
