"""Progress bars (`common.progress`): drawn on stderr when it is a terminal, never into a pipe,
never with `--no-progress` / `--quiet`; stdout keeps only the command's own output."""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from common.progress import add_progress_argument, progress_bar, progress_enabled

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import argparse, sys
from common.progress import add_progress_argument, progress_bar, prints_above_bars
p = argparse.ArgumentParser()
add_progress_argument(p)
args = p.parse_args(sys.argv[1:])
with progress_bar(3, "demo", "req", args=args, mininterval=0) as bar, prints_above_bars(not args.no_progress):
    for i in range(3):
        print(f"line {i}")
        bar.update(1)
print("done")
"""


def _run(*flags: str, tty: bool) -> tuple[str, str]:
    """(stdout, stderr) of the demo script, its stderr a 100x30 terminal when `tty`."""
    if not tty:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, *flags], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        return proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, *flags], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=slave, text=True, timeout=60)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
        return proc.stdout, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_bar_on_a_terminal_and_prints_stay_whole() -> None:
    out, err = _run(tty=True)
    assert "demo:" in err and "3/3" in err
    assert out.splitlines() == ["line 0", "line 1", "line 2", "done"]


@pytest.mark.parametrize("flag", ["--no-progress", "--quiet"])
def test_no_bar_when_told(flag: str) -> None:
    out, err = _run(flag, tty=True)
    assert "demo" not in err
    assert out.splitlines() == ["line 0", "line 1", "line 2", "done"]


def test_no_bar_into_a_pipe() -> None:
    out, err = _run(tty=False)
    assert err == ""
    assert out.splitlines() == ["line 0", "line 1", "line 2", "done"]


def test_flags_and_disabled_bar_is_a_no_op() -> None:
    parser = argparse.ArgumentParser()
    add_progress_argument(parser)
    assert parser.parse_args([]).no_progress is False
    assert parser.parse_args(["--quiet"]).no_progress is True
    assert progress_enabled(parser.parse_args(["--no-progress"])) is False
    with progress_bar(2, "x", enabled=False) as bar:
        bar.update(5)  # no error, nothing drawn
        bar.set_postfix_str("y")


def test_generate_takes_no_progress() -> None:
    from xllm.cli import build_parser

    assert build_parser().parse_args(["generate", "--no-progress", "hi"]).no_progress is True
