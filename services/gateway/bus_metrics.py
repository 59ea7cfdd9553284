"""`xllm_bus_invalid_messages_total{service, reason}` on the gateway's /metrics.

Dropped inbound bus messages are counted per process by `common.bus_guard`; the gateway reports
its own and the scheduler's (from the scheduler's status summary, refreshed with every
StatusReply), so one scrape shows junk arriving anywhere on the bus. A collector rather than a
Counter: the numbers are owned elsewhere and only read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from common.bus_guard import invalid_message_counts

__all__ = ["BusInvalidMessages"]


class BusInvalidMessages(Collector):
    def __init__(self, scheduler_info: Callable[[], Mapping[str, Any]]) -> None:
        self.scheduler_info = scheduler_info

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("xllm_bus_invalid_messages", "Inbound bus messages dropped as invalid (or "
                                     "unread from a peer past its error budget), by service and reason",
                                     labels=["service", "reason"])
        for reason, count in sorted(invalid_message_counts().items()):
            family.add_metric(["gateway", reason], count)
        reported = self.scheduler_info().get("bus_invalid_messages")
        if isinstance(reported, Mapping):
            for reason, count in sorted(reported.items()):
                if isinstance(reason, str) and isinstance(count, (int, float)) and not isinstance(count, bool):
                    family.add_metric(["scheduler", reason[:40]], count)
        yield family
