"""The benchmarks' shared helpers: the base URL, the percentile math, the error digest."""

from __future__ import annotations

import pytest

from bench.client import RequestResult, base_url
from bench.stats import distinct_errors, percentile, percentile_ms


def test_base_url_ends_in_v1_exactly_once() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert base_url(url) == "http://h:1/v1"


def test_percentile_interpolates_between_neighbours() -> None:
    values = [0.1, 0.2, 0.3, 0.4]
    assert percentile(values, 0.0) == pytest.approx(0.1) and percentile(values, 1.0) == pytest.approx(0.4)
    assert percentile(values, 0.5) == pytest.approx(0.25)
    assert percentile(values, 0.9) == pytest.approx(0.37)
    assert percentile([7.0], 0.99) == 7.0
    assert percentile_ms([0.3, 0.1, 0.2], 0.5) == pytest.approx(200.0)  # sorts for itself
    assert percentile_ms([], 0.5) is None


def test_distinct_errors_keeps_the_first_different_ones() -> None:
    def failed(error: str) -> RequestResult:
        return RequestResult(ok=False, error=error)

    results = [failed("a"), RequestResult(ok=True), failed("a"), failed("b"), failed("c"), failed("d")]
    assert distinct_errors(results) == ["a", "b", "c", "d"]
    assert distinct_errors(results, limit=2) == ["a", "b"]
    assert distinct_errors([RequestResult(ok=True)]) == []


def test_tpot_needs_two_tokens() -> None:
    assert RequestResult(ok=True, ttft=0.1, e2e=0.5, output_tokens=5).tpot == pytest.approx(0.1)
    assert RequestResult(ok=True, ttft=0.1, e2e=0.1, output_tokens=1).tpot is None
