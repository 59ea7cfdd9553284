"""What a bench records about the machine it ran on: timings only compare on the same CPU kind."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_model", "cpu_flags"]

# The flags that decide the GEMM and attention kernels' speed here.
_KERNEL_FLAG_PREFIXES = ("amx", "avx512_bf16", "avx512_vnni", "avx512f")


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where /proc/cpuinfo cannot be read)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    """The kernel-relevant CPU flags present (AMX, AVX-512 F/BF16/VNNI), sorted; empty where unknown."""
    flags = next((ln.split(":", 1)[1].split() for ln in _cpuinfo_lines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(_KERNEL_FLAG_PREFIXES))
