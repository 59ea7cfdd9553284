"""The operator's status page (`/`, `/ui`) in a real headless Chromium.

One real `xllm serve` (two workers, an API key) takes a couple of requests; Chromium loads the page
with `?key=`, lets its script poll `/status` and `/metrics` for a few (virtual) seconds, and the
dumped DOM must show both instance ids and a non-zero request count; a screenshot must be a valid,
non-blank PNG. A second check renders the same shipped page against a small aiohttp app whose
`/status` carries hostile strings (instance ids come from the bus), to prove they are shown as text.

Skipped where no Chromium is installed (`.ci/run` installs Debian's `chromium` when it can).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import openai
import pytest
from aiohttp import web
from PIL import Image

from common.bus import free_tcp_port
from services.gateway import status_page

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (apt-get install chromium)")

API_KEY = "status-page-key"
RESULTS = Path(__file__).resolve().parents[2] / "results"
CHROMIUM_TIMEOUT_S = 120.0
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars")


def chromium(url: str, *args: str, budget_ms: int = 8000) -> str:
    """Run headless Chromium on `url` for `budget_ms` of virtual time; its stdout (the DOM with --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="xllm-chromium-") as profile:
        proc = subprocess.run(
            [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
        )
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def cell_text(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no #{element_id} in the page:\n{dom[:3000]}"
    return html.unescape(match.group(1))


def keyed_status(server) -> dict:  # noqa: ANN001 - the conftest's XllmServer
    request = urllib.request.Request(server.base_url + "/status", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(xllm_server_factory):  # noqa: ANN001, ANN201 - pytest fixture
    return xllm_server_factory(workers=2, extra_args=("--api-key", API_KEY))


def test_page_and_assets_are_served_offline_without_the_key(server) -> None:  # noqa: ANN001
    for path, kind in (("/", "text/html"), ("/ui", "text/html"), ("/ui/status.js", "text/javascript"),
                       ("/ui/status.css", "text/css")):
        with urllib.request.urlopen(server.base_url + path, timeout=30) as resp:
            body = resp.read().decode()
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith(kind)
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        # Offline: nothing but the SVG namespace may name another origin.
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body), f"{path} names an external URL"
    assert "innerHTML" not in (status_page.STATIC_DIR / "status.js").read_text()
    # The data is still behind the key.
    status, body = server.request("GET", "/status")
    assert status == 401, body


def test_page_shows_live_values_and_takes_a_screenshot(server) -> None:  # noqa: ANN001
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for prompt in ("Hello", "The capital of France is"):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=4)
        assert out.usage.completion_tokens > 0
    ids = sorted(str(inst["id"]) for inst in keyed_status(server)["instances"])
    assert len(ids) == 2

    dom = chromium(f"{server.base_url}/?key={API_KEY}", "--dump-dom")
    for instance_id in ids:
        assert f'data-instance="{html.escape(instance_id)}"' in dom, dom[:4000]
    assert int(cell_text(dom, "requests-total")) >= 2
    assert int(re.search(r'data-polls="(\d+)"', dom).group(1)) >= 2
    assert cell_text(dom, "health") == "ready"
    assert cell_text(dom, "model") == model
    assert re.fullmatch(r"\d+ ms", cell_text(dom, "ttft-all")), cell_text(dom, "ttft-all")  # from /metrics
    assert int(cell_text(dom, "gen-all")) >= 2

    RESULTS.mkdir(exist_ok=True)
    png = RESULTS / "status_page.png"
    png.unlink(missing_ok=True)
    chromium(f"{server.base_url}/ui?key={API_KEY}", f"--screenshot={png}", "--window-size=1280,800")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == (1280, 800)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, "the screenshot is blank"


def test_page_without_the_key_asks_for_it(server) -> None:  # noqa: ANN001
    dom = chromium(f"{server.base_url}/", "--dump-dom", budget_ms=3000)
    assert re.search(r'<form id="key-form"(?![^>]*hidden)', dom), "the key form is not shown"
    assert "needs the API key" in cell_text(dom, "error")
    assert "data-instance=" not in dom


# ---- the page against hostile strings: a small app serving the shipped files and a crafted /status

_EVIL = '<img src=x onerror="document.title=\'pwned\'">"&\'</td>'


async def _evil_status(request: web.Request) -> web.Response:
    instance = {"id": _EVIL, "role": _EVIL, "state": _EVIL, "ready": True, "waiting": 1, "running": 2,
                "total_pages": 10, "used_pages": 4, "prefix_hit_rate": 0.5, "stats": {"flips_total": 1}}
    return web.json_response({
        "ready": True, "scheduler_reachable": True, "status_age_s": 0.1,
        "gateway": {"id": _EVIL, "model": _EVIL, "in_flight": 0, "max_in_flight": 8},
        "scheduler": {"pd_policy": _EVIL, "workers": {"up": 1, "expected": 1, "by_role": {_EVIL: 1}},
                      "recent_flips": [{"instance": _EVIL, "from": "decode", "to": "prefill", "reason": _EVIL,
                                        "at": 1}],
                      "kvstore": {"dram_blocks": 3, "dram_bytes": 4096, "ssd_blocks": 0, "ssd_bytes": 0}},
        "instances": [instance, "not an object", None],
    })


async def _evil_metrics(request: web.Request) -> web.Response:
    return web.Response(text='xllm_requests_finished_total{finish_reason="st\\"op"} 7.0\n'
                             "xllm_generation_tokens_total 70.0\nnot a metric line\n",
                        content_type="text/plain")


@pytest.fixture()
def evil_app() -> Iterator[str]:
    port = free_tcp_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    status_page.add_routes(app)
    app.router.add_get("/status", _evil_status)
    app.router.add_get("/metrics", _evil_metrics)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_hostile_strings_are_shown_as_text(evil_app: str) -> None:
    dom = chromium(evil_app + "/", "--dump-dom", budget_ms=4000)
    parsed = _Tags()
    parsed.feed(dom)
    assert "img" not in parsed.tags, "a string from /status became markup"
    assert "<title>xllm status</title>" in dom  # the onerror handler never ran
    assert cell_text(dom, "requests-total") == "7"
    # shown verbatim as text: instance id, role, state, model, pool, flip lines...
    assert sum(_EVIL in chunk for chunk in parsed.text) >= 5, dom[:4000]
