"""What the soak and chaos benchmarks watch of a running xllm server: its worker processes (found
in the launcher's process tree, or by the pids the workers report in `/status`), their RSS, the KV
pages each instance holds (`/status`), and the gateway's Prometheus series (`/metrics`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["WORKER_MODULES", "InstanceView", "MetricSample", "worker_processes", "service_process", "rss_of",
           "fetch_status", "instance_views", "fetch_metrics", "metric_total", "histogram_quantile"]

# `python -m <module>` of a worker process, whatever role it started in.
WORKER_MODULES = ("services.decode", "services.prefill", "services.worker")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_processes(launcher_pid: int) -> dict[str, psutil.Process]:
    """Instance id (its `--instance-id` flag) -> live worker process, among the launcher's children."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found: dict[str, psutil.Process] = {}
    for child in children:
        argv = _cmdline(child)
        if "-m" not in argv or not any(m in argv for m in WORKER_MODULES) or not _alive(child):
            continue
        if "--instance-id" in argv and argv.index("--instance-id") + 1 < len(argv):
            found[argv[argv.index("--instance-id") + 1]] = child
    return found


def service_process(launcher_pid: int, module: str) -> psutil.Process | None:
    """The launcher's live child started as `python -m module` (the scheduler, the gateway)."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        if module in _cmdline(child) and _alive(child):
            return child
    return None


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    """Resident set size in bytes of each named pid that is still there."""
    out: dict[str, int] = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


@dataclass
class InstanceView:
    """One worker instance as `/status` reports it (the scheduler's view, about 0.5 s old)."""

    id: str
    state: str
    used_pages: int
    total_pages: int
    running: int
    waiting: int
    inflight: int
    pid: int | None
    integrity_failures: int
    audited_at_step: int
    steps: int

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.inflight == 0


async def fetch_status(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> dict | None:
    """`GET {url}/status` as a dict, or None when the gateway does not answer it."""
    try:
        async with session.get(url + "/status", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            return await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


def _int(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def instance_views(status: dict | None) -> dict[str, InstanceView]:
    """Instance id -> what `/status` says of it ({} for no status)."""
    views: dict[str, InstanceView] = {}
    for inst in (status or {}).get("instances") or []:
        stats = inst.get("stats") or {}
        pid = stats.get("pid")
        views[str(inst.get("id"))] = InstanceView(
            id=str(inst.get("id")), state=str(inst.get("state", "")), used_pages=_int(inst.get("used_pages")),
            total_pages=_int(inst.get("total_pages")), running=_int(inst.get("running")),
            waiting=_int(inst.get("waiting")), inflight=_int(inst.get("inflight")),
            pid=pid if isinstance(pid, int) else None, integrity_failures=_int(stats.get("integrity_failures")),
            audited_at_step=_int(stats.get("audited_at_step")), steps=_int(stats.get("steps")),
        )
    return views


@dataclass
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


async def fetch_metrics(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> list[MetricSample]:
    """Every sample of `GET {url}/metrics` ([] when the gateway does not answer)."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return []
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return []
    return [MetricSample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_total(samples: list[MetricSample], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0.0 when there is none)."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def histogram_quantile(samples: list[MetricSample], name: str, q: float) -> float | None:
    """The q-quantile of histogram `name` (its `_bucket` series), interpolated within the bucket
    as Prometheus' histogram_quantile does; None when it has no observation."""
    buckets = sorted(((float(s.labels["le"]), s.value) for s in samples
                      if s.name == name + "_bucket" and "le" in s.labels), key=lambda b: b[0])
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le  # the highest finite bound: all one can say
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return prev_le
