"""The CI form of `xllm bench soak`: a few hundred requests of every kind (malformed and abandoned
ones included) against two real workers; no 5xx, every malformed request refused with a 4xx JSON
error, and the KV pages back to the idle level with a clean page-pool audit afterwards."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from bench import soak
from bench.soak_workload import MALFORMED_VARIANTS

REQUESTS = 250


pytestmark = pytest.mark.slow  # real processes: tens of seconds each


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=2)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_soak_leaves_no_error_and_no_page_behind(server, settle_pools):
    args = _args("--requests", str(REQUESTS), "--concurrency", "16", "--warmup", "10", "--max-output", "8",
                 "--seed", "3", "--sample-every", "1", "--idle-timeout", "60", "--timeout", "120")
    doc = asyncio.run(soak.run_async(args, server.base_url, server.proc.pid))
    counts = doc["counts"]

    assert counts["sent"] == REQUESTS
    assert counts["server_errors_5xx"] == 0, counts["problems"]
    assert counts["no_response"] == 0, counts["problems"]
    assert counts["unexpected"] == 0, counts["problems"]
    malformed = counts["by_kind"]["malformed"]
    assert malformed["sent"] > 0 and malformed["unexpected"] == 0
    assert all(400 <= int(code) < 500 for code in malformed["status"]), malformed["status"]
    assert len(malformed["variants"]) >= len(MALFORMED_VARIANTS) // 2  # the mix reached most kinds of bad input
    assert counts["by_kind"]["abort"]["sent"] > 0

    assert doc["pages"]["settled"] and doc["pages"]["back_to_idle"], doc["pages"]
    assert doc["pages"]["peak_total"] > 0  # the load really held pages
    assert doc["integrity_failures"] == 0
    # Once idle, every worker has audited its page pool after its last step, with no failure.
    settle_pools(server, doc["pages"]["idle_before"])
