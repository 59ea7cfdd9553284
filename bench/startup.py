"""How fast a worker starts, and how fast a killed one serves again: `python -m bench.startup OUT.json`.

Two measurements, written to one JSON file:

* ``engine``: a fresh process builds the engine a worker builds (imports, model load, KV pool,
  C++ kernels) and serves one greedy request, with the weight cache off, cold (an empty cache
  directory: a miss, then the entry is written) and warm (the same directory again: a hit). Each
  start reports its phases (``load_timings`` of :func:`common.models.registry.load_model`).
* ``restart``: ``xllm serve --workers 2``; a worker is SIGKILLed and ``/status`` is polled until
  that worker's new process is registered and ready, then requests are sent until the new process
  has served one. Reported: kill -> ready and kill -> first served request, per kill.

``--repo DIR`` runs the ``restart`` part from another checkout (e.g. ``git archive HEAD`` unpacked:
the numbers before a change), with its own ``TORCH_EXTENSIONS_DIR`` (a new one unless set) so its C++ kernels
do not replace this tree's build.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.server_proc import running_server

_REPO = Path(__file__).resolve().parent.parent
_PROMPT = [1, 9690, 28, 1047, 314, 253]  # a few in-vocabulary ids: the request only has to run


# ---- one engine start, in the process being measured ---------------------------------------

def _engine_child(args: argparse.Namespace) -> None:
    """Build an engine the way a worker does and print its phases as one JSON line."""
    t0 = time.perf_counter()
    import torch

    t_torch = time.perf_counter()
    from common.engine.config import EngineConfig
    from common.engine.engine import LLMEngine
    from common.engine.sampling_params import SamplingParams

    t_imports = time.perf_counter()
    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                          num_threads=args.threads, weight_cache=args.cache_dir != "",
                          weight_cache_dir=args.cache_dir or None)
    engine = LLMEngine(config)
    t_engine = time.perf_counter()
    engine.add_request("startup", list(_PROMPT), SamplingParams(max_tokens=4, temperature=0.0))
    tokens: list[int] = []
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            if first is None and out.new_token_ids:
                first = time.perf_counter()
    load = dict(getattr(engine.model, "load_timings", {}))
    print(json.dumps({
        "import_torch_s": t_torch - t0,
        "import_engine_s": t_imports - t_torch,
        "engine_init_s": t_engine - t_imports,
        "model_load": load,
        "engine_init_other_s": t_engine - t_imports - float(load.get("total", 0.0)),
        "first_token_s": (first or time.perf_counter()) - t_engine,
        "process_to_first_token_s": (first or time.perf_counter()) - t0,
        "dtype": str(engine.model.model.embed_tokens.weight.dtype),
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
    }), flush=True)


def _engine_start(args: argparse.Namespace, cache_dir: str) -> dict:
    argv = [sys.executable, "-m", "bench.startup", "--engine-child", "--cache-dir", cache_dir,
            "--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory]
    if args.model:
        argv += ["--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=_REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"engine start failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall  # process spawn -> exit, first request included
    return result


def measure_engine(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="xllm-startup-cache-") as cache_dir:
        runs = {"no_cache": _engine_start(args, "")}
        runs["cold"] = _engine_start(args, cache_dir)
        runs["warm"] = _engine_start(args, cache_dir)
    for name, run in runs.items():
        load = run["model_load"]
        print(f"[engine] {name:8s} wall {run['wall_s']:5.1f} s  engine {run['engine_init_s']:5.1f} s  "
              f"(load {load.get('total', 0):.1f} s, cache {load.get('cache')})  first token "
              f"{run['first_token_s']:.2f} s", flush=True)
    runs["greedy_tokens_equal"] = len({tuple(r["tokens"]) for r in runs.values()}) == 1
    return runs


# ---- kill -> ready under xllm serve ---------------------------------------------------------

def _get(url: str, timeout_s: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _instance(base: str, worker: str) -> dict | None:
    status = _get(base + "/status") or {}
    return next((i for i in status.get("instances") or [] if i.get("id") == worker), None)


def _complete(base: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _one_kill(base: str, model: str, worker: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    inst: dict = {}
    while not (inst.get("stats") or {}).get("pid"):  # its first heartbeat carries the pid
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker} has no pid in /status")
        time.sleep(0.1)
        inst = _instance(base, worker) or {}
    old_pid, old_incarnation = inst["stats"]["pid"], inst.get("incarnation")
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    deadline = killed + timeout_s
    ready = served = None
    served_before = None
    while time.monotonic() < deadline and served is None:
        inst = _instance(base, worker) or {}
        pid = (inst.get("stats") or {}).get("pid")
        fresh = pid not in (None, old_pid) and inst.get("incarnation") != old_incarnation
        if ready is None and fresh and inst.get("ready"):
            ready = time.monotonic()
            served_before = inst["stats"].get("requests_total", 0)
        if ready is not None:
            # Requests until the new process has served one (the router may pick the other worker).
            if not _complete(base, model):
                raise RuntimeError("a request failed after the restart")
            total = ((_instance(base, worker) or {}).get("stats") or {}).get("requests_total", 0)
            if total > served_before:
                served = time.monotonic()
                continue
        time.sleep(0.05)
    if served is None:
        raise RuntimeError(f"{worker} did not serve again within {timeout_s:g} s")
    return {"kill_to_ready_s": ready - killed, "kill_to_served_s": served - killed}


def measure_restart(args: argparse.Namespace) -> dict:
    repo = Path(args.repo).resolve() if args.repo else _REPO
    if repo != _REPO and "TORCH_EXTENSIONS_DIR" not in os.environ:
        # inherited by the server we start (its first start compiles the kernels there)
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="xllm-startup-ext-")
    url = f"http://127.0.0.1:{args.port}"
    argv = [sys.executable, "-m", "xllm", "serve", "--workers", "2", "--port", str(args.port),
            "--kv-cache-memory", args.kv_cache_memory]
    for extra in args.serve_arg or []:
        argv += extra.split()
    cwd = os.getcwd()
    os.chdir(repo)  # `python -m xllm` of that checkout
    try:
        with running_server(argv, url, args, "restart"):
            model = (_get(url + "/v1/models") or {}).get("data", [{}])[0].get("id", "default")
            if not _complete(url, model):
                raise RuntimeError("the first request failed")
            kills = []
            for i in range(args.kills):
                worker = f"worker-{i % 2}"
                kills.append({"worker": worker, **_one_kill(url, model, worker, args.timeout)})
                print(f"[restart] {worker}: kill -> ready {kills[-1]['kill_to_ready_s']:.1f} s, "
                      f"-> served {kills[-1]['kill_to_served_s']:.1f} s", flush=True)
    finally:
        os.chdir(cwd)
    return {"repo": str(repo), "argv": argv[1:], "kills": kills}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="JSON result file")
    p.add_argument("--parts", default="engine,restart", help="engine, restart or both (comma separated)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV pool per worker (default: 1GiB)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the measured engine (xllm serve gives each worker its share of the CPUs)")
    p.add_argument("--kills", type=int, default=2, help="workers killed one after another")
    p.add_argument("--repo", default=None, help="run the restart part from this checkout")
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per start / restart")
    p.add_argument("--serve-arg", action="append", help="extra flags for xllm serve (repeatable)")
    p.add_argument("--server-log", default=None, help="append the server's output here")
    # internal: one measured engine start
    p.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_child:
        _engine_child(args)
        return 0
    if not args.out:
        p.error("the JSON result path is required")
    parts = {part.strip() for part in args.parts.split(",")}
    result: dict = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if "engine" in parts:
        result["engine"] = measure_engine(args)
    if "restart" in parts:
        result["restart"] = measure_restart(args)
    result["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
