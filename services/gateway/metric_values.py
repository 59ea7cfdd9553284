"""Small helpers the gateway's Prometheus modules share: reading numbers out of status dicts and
dropping a labelled series that may not exist."""

from __future__ import annotations

from typing import Any

from prometheus_client import Gauge

__all__ = ["as_number", "remove_series"]


def remove_series(gauge: Gauge, *labels: str) -> None:
    """Drop one labelled series (an instance that left); nothing when it was never set."""
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


def as_number(value: Any, default: float = 0.0) -> float:
    """``value`` as a float when it is a real number (bools and anything else: ``default``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)
