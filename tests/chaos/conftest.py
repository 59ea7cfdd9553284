"""Chaos tests: real `xllm serve` processes, killed with SIGKILL on purpose.

The server fixtures are the integration tests' own (`tests/integration/conftest.py`), loaded by
path so both directories share one definition; this file adds what the chaos tests check after a
fault: every surviving worker idle, its KV pages back to the idle level, and its page-pool audit
(the worker runs `BlockManager.check_integrity` once per idle period and reports the failures in
`/status`) clean and done after the last engine step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
_NAME = "xllm_integration_fixtures"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
_fixtures = sys.modules[_NAME]

XllmServer = _fixtures.XllmServer
start_server = _fixtures.start_server
wait_until = _fixtures.wait_until
xllm_server_factory = _fixtures.xllm_server_factory  # the module-scoped fixture, registered here too

__all__ = ["XllmServer", "start_server", "wait_until", "xllm_server_factory", "wait_pools_settled", "settle_pools"]


def wait_pools_settled(server: Any, idle_pages: dict[str, int] | None = None, timeout_s: float = 60.0) -> dict:
    """Wait until every instance `/status` lists is idle, holds no more KV pages than `idle_pages`
    says (0 for an instance it does not name) and has audited its page pool since its last engine
    step; then assert no audit ever failed. Returns the instances as last seen."""
    idle_pages = idle_pages or {}

    def settled() -> dict | None:
        instances = server.instances()
        if not instances:
            return None
        for iid, inst in instances.items():
            stats = inst.get("stats") or {}
            if inst["running"] or inst["waiting"] or inst["inflight"]:
                return None
            if inst["used_pages"] > idle_pages.get(iid, 0):
                return None
            if stats.get("audited_at_step") != stats.get("steps"):
                return None
        return instances

    try:
        instances = wait_until(settled, timeout_s, "every worker idle, its pages back and its pool audited")
    except AssertionError:
        seen = {iid: {k: inst.get(k) for k in ("running", "waiting", "inflight", "used_pages")}
                | {k: (inst.get("stats") or {}).get(k) for k in ("steps", "audited_at_step", "integrity_failures")}
                for iid, inst in server.instances().items()}
        raise AssertionError(f"workers did not settle within {timeout_s:.0f} s: {seen}") from None
    failures = {iid: (inst.get("stats") or {}).get("integrity_failures") for iid, inst in instances.items()}
    assert not any(failures.values()), f"KV page pool integrity check failed: {failures}"
    return instances


@pytest.fixture
def settle_pools():
    """`wait_pools_settled` for test modules (importing a conftest by name is fragile)."""
    return wait_pools_settled
