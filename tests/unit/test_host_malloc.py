"""keep_freed_memory: a step's large temporaries stop costing fresh page faults every time."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from common.engine.host_malloc import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    def cycle():
        # A step's temporaries: several 12.8 MB blocks (a 64-row step's logits) alive at once.
        for _ in range(5):
            live = [torch.empty(3_200_000, dtype=torch.float32).fill_(1.0) for _ in range(6)]
            del live
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = os.getcwd()
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tuned_process_reuses_large_blocks():
    # Untuned, the freed heap top (77 MB) is usually past the trim threshold glibc derives from the
    # blocks' size, so it is returned and every round faults its pages in again (measured ~94,000
    # faults for these five rounds; how much glibc keeps varies with the process's history).
    # Tuned, the second pass reuses the first one's pages.
    tuned = _faults("tuned")
    assert tuned < 1_000, (tuned, _faults("plain"))


def test_user_environment_wins(monkeypatch):
    from common.engine.host_malloc import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_memory() is False
