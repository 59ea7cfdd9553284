"""The Triton kernels compile for real NVIDIA targets (Hopper sm_90, Ampere sm_80) without a GPU,
and the attention tiles the wrappers pick do not spill registers: the interpreter tests check
the numbers, this checks what only the compiler sees (types, layouts, register pressure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _triton_env import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/unit/_triton_aot.py"), str(arch)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        assert r["stack"] == 0, f"{r['name']} spills on sm_{arch}: {r}"
        assert r["regs"] <= 255
