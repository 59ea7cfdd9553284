"""Progress bars for long command-line runs (`xllm generate`, the benchmarks), drawn by tqdm.

A bar goes to stderr, so stdout stays the results (JSON lines, tables) a script may parse; it is
off when stderr is not a terminal (CI, pipes, log files) and with `--no-progress` / `--quiet`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

__all__ = ["add_progress_argument", "progress_enabled", "progress_bar", "prints_above_bars"]


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """`--no-progress` (alias `--quiet`) on a command that draws progress bars."""
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="draw no progress bar (none is drawn anyway when stderr is not a terminal)")


def progress_enabled(args: argparse.Namespace | None = None) -> bool:
    """Whether to draw: stderr is a terminal and the command was not told otherwise."""
    if args is not None and getattr(args, "no_progress", False):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: float | None, desc: str, unit: str = "it", *, enabled: bool | None = None,
                 args: argparse.Namespace | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; a disabled bar (every call a no-op) unless `enabled` (default: from
    `progress_enabled(args)`). Use it as a context manager so the bar is closed on errors too."""
    if enabled is None:
        enabled = progress_enabled(args)
    # leave=False: once done, the bar makes way for the command's own summary line.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True, **kwargs)


@contextmanager
def prints_above_bars(enabled: bool) -> Iterator[None]:
    """While a bar is drawn, route `print()` (stdout) through tqdm so each line appears above the
    bar instead of being written into it. A no-op when `enabled` is false."""
    if not enabled:
        yield
        return
    original = sys.stdout
    sys.stdout = DummyTqdmFile(original)
    try:
        yield
    finally:
        sys.stdout = original
