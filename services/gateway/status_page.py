"""The operator's status page: `/` and `/ui` serve a static HTML page whose script polls `/status`
and `/metrics` every second or two and draws pools, instances and sparklines in the browser.

The page and its assets are files shipped in the package (`static/`), read once at start-up; they
hold no data, so they are served without the API key. The data stays behind the same auth as
`/status`: when a key is set, the script takes it from `?key=` (kept in sessionStorage, dropped
from the address bar) or from a form, and sends it as a Bearer header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

__all__ = ["PUBLIC_PATHS", "STATIC_DIR", "add_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_PAGE_PATHS = ("/", "/ui", "/ui/")
# path -> (file under static/, content type)
_FILES: dict[str, tuple[str, str]] = {
    **{path: ("status.html", "text/html; charset=utf-8") for path in _PAGE_PATHS},
    "/ui/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/ui/status.css": ("status.css", "text/css; charset=utf-8"),
}

# Paths the auth middleware lets through without the key: static files only, never data.
PUBLIC_PATHS = frozenset(_FILES)

# Only our own origin: the page works offline, and an injected string could load nothing.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _load(name: str) -> bytes:
    try:
        return (STATIC_DIR / name).read_bytes()
    except OSError as exc:  # a broken install: say which file is missing instead of a bare 500 later
        raise RuntimeError(f"status page file missing from the package: {STATIC_DIR / name}") from exc


def add_routes(app: web.Application) -> None:
    """Register GET (and HEAD) handlers for the page and its assets on `app`."""
    bodies = {name: _load(name) for name, _ in set(_FILES.values())}
    for path, (name, content_type) in _FILES.items():
        app.router.add_get(path, _handler(bodies[name], content_type))


def _handler(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type, **_HEADERS})

    return handle
