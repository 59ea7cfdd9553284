"""Loading the C++ kernels survives a build that died holding torch's build lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernels.cpu_ext import _module_name, cpu_ops_module

pytestmark = pytest.mark.skipif(cpu_ops_module() is None, reason="the C++ CPU kernels cannot be built here")


def test_a_stale_build_lock_is_removed_instead_of_waited_on() -> None:
    from torch.utils.cpp_extension import _get_build_directory

    baton = Path(_get_build_directory(_module_name(), False)) / "lock"
    baton.touch()  # what a build killed half way leaves behind
    # A fresh process (the module is cached per process): without the fix it waits forever.
    code = "from kernels.cpu_ext import cpu_ops_module; assert cpu_ops_module() is not None"
    done = subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not baton.exists(), done.stderr[-2000:]
