"""Where every bench leaves its results: a JSON document, and a PNG when a plot is asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["write_json", "write_plot"]


def _parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(path: str | None, doc: Any) -> None:
    """Write `doc` (indented) to `path`, creating its folder; nothing when `path` is None."""
    if not path:
        return
    _parent(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"results written to {path}")


def write_plot(path: str | None, draw: Callable[[str, Any], Any], doc: Any) -> None:
    """`draw(path, doc)` into `path` (its folder created); a draw that returns False drew nothing."""
    if not path:
        return
    _parent(path)
    if draw(path, doc) is not False:
        print(f"plot written to {path}")
