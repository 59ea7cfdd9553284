"""`xllm serve`: the single-box topology, as the command lines of its child processes.

Every flag of `xllm serve` is a setting of some config dataclass: the engine's (`EngineConfig`,
for every worker), the launcher's own (`ServeConfig`: how many workers of which role, where the
kvstore keeps its files, the run dir), and a few of the services' own (`SERVE_SECTIONS`: the
scheduler's P/D policy, the gateway's HTTP address, ...), shown under the service's name, type,
default and help. Each child's command line is its config dataclass written back as flags
(`common.settings.to_argv`), so a setting is never spelt twice; `xllm.launcher` supervises them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from common.bus import default_ipc_dir
from common.engine.config import EngineConfig
from common.service_config import ServiceConfig
from common.settings import Section, SettingsParser, setting, to_argv
from services.gateway.config import GatewayConfig
from services.kvstore.config import KvStoreConfig
from services.scheduler.config import SchedulerConfig
from services.worker.config import WorkerConfig
from services.scheduler.epd_placement import EP_D, PLACEMENT_CHOICES
from xllm.epd_serve import encoder_argv, encoder_ids, is_multimodal_model, resolve_placement
from xllm.launcher import ChildSpec, Launcher

__all__ = ["SERVE_SECTIONS", "ServeConfig", "add_serve_arguments", "build_specs", "run_serve", "worker_roles",
           "worker_threads"]


@dataclass
class ServeConfig:
    """The launcher's own settings: which children it starts, and how it supervises them."""

    workers: int = setting(1, "number of mixed workers when no --prefill-workers/--decode-workers are given")
    prefill_workers: int = setting(0, "workers starting in the prefill role")
    decode_workers: int = setting(0, "workers starting in the decode role")
    mixed_workers: int | None = setting(
        None, "mixed workers beside the P/D pools (default: --workers without P/D pools, else 0)")
    kvstore_dir: str | None = setting(
        None, "start the kvstore (DRAM tier + LMDB SSD tier under DIR): workers offload evicted KV pages to it "
              "and reload prefix hits from it")
    run_dir: str | None = setting(None, "directory for the ipc sockets (default: a fresh temporary one)")
    stop_timeout: float = setting(10.0, "seconds to wait for children on stop")
    epd_placement: str = setting(
        EP_D, "where a multimodal model's images are encoded: ep-d (in the prefill worker), ed-p (encoders beside "
              "the decode workers), e-p-d (standalone encoders), auto (the choice `xllm profile epd` wrote)",
        choices=PLACEMENT_CHOICES)
    encoder_workers: int = setting(1, "encoder processes for --epd-placement ed-p / e-p-d")
    epd_profile: str | None = setting(
        None, "the `xllm profile epd` output --epd-placement auto reads (default: the model's file under the "
              "xllm cache directory)")

    def problems(self) -> list[str]:
        counts = (self.workers, self.prefill_workers, self.decode_workers, self.mixed_workers or 0)
        if min(counts) < 0 or self.workers < 1:
            return ["worker counts must be >= 0 (and --workers >= 1)"]
        if self.encoder_workers < 0:
            return ["--encoder-workers must be >= 0"]
        if bool(self.prefill_workers) != bool(self.decode_workers) and not self.mixed_workers:
            return ["P/D disaggregation needs --prefill-workers and --decode-workers (or --mixed-workers)"]
        return []


ENGINE = Section(EngineConfig, "engine")
SERVE = Section(ServeConfig, "serve")
# The services' settings `xllm serve` exposes: their own flags, except the kvstore's tier budgets,
# which read as `--kvstore-dram/--kvstore-ssd` beside `--kvstore-dir`.
SCHEDULER = Section(SchedulerConfig, "scheduler", only=("pd_policy", "ttft_slo_ms", "tpot_slo_ms", "suspect_after",
                                                       "heartbeat_timeout", "dp_balance", "dp_balance_threshold",
                                                       "dp_balance_interval_s", "dp_balance_max_per_tick",
                                                       "dp_balance_cooldown_s", "dp_balance_recompute_below"))
WORKER = Section(WorkerConfig, "worker", only=("kv_transfer_timeout", "kvstore_timeout", "step_watchdog_s"))
KVSTORE = Section(KvStoreConfig, "kvstore (with --kvstore-dir)", only=("dram_bytes", "ssd_bytes"),
                  flags={"dram_bytes": "--kvstore-dram", "ssd_bytes": "--kvstore-ssd"})
GATEWAY = Section(GatewayConfig, "gateway", only=("host", "port", "api_key", "max_queue", "batch_dir",
                                                   "batch_max_in_flight", "max_batch_file_bytes", "batch_tpot_target_ms",
                                                   "http_header_timeout", "http_body_timeout",
                                                   "http_keepalive_timeout", "max_connections",
                                                   "embedding_pooling", "embedding_normalize", "tool_call_parser",
                                                   "request_timeout", "max_migrations", "scheduler_wait",
                                                   "image_max_bytes", "image_fetch_timeout", "image_max_pixels",
                                                   "max_images_per_request"))
SERVE_SECTIONS = (SERVE, SCHEDULER, WORKER, KVSTORE, GATEWAY)


def add_serve_arguments(parser: SettingsParser) -> None:
    """The launcher's flags and the services' it exposes (the engine flags are added by the caller)."""
    for section in SERVE_SECTIONS:
        parser.add_section(section)
    # No default here: the top-level `xllm --log-level` stays in effect unless given again.
    parser.add_settings(ServiceConfig, "serve", only=("log_level",), defaults={"log_level": argparse.SUPPRESS})


def worker_threads(requested: int | None, workers: int) -> int:
    """Torch threads per worker: as asked, else the CPUs this process may use split evenly."""
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def worker_roles(serve: ServeConfig) -> list[tuple[str, str]]:
    """(instance id, starting role) of every worker `xllm serve` starts."""
    if not serve.prefill_workers and not serve.decode_workers:
        # The single-box default: mixed workers named as before P/D pools existed.
        count = serve.mixed_workers if serve.mixed_workers is not None else serve.workers
        return [(f"worker-{i}", "mixed") for i in range(count)]
    roles = [(f"prefill-{i}", "prefill") for i in range(serve.prefill_workers)]
    roles += [(f"decode-{i}", "decode") for i in range(serve.decode_workers)]
    roles += [(f"mixed-{i}", "mixed") for i in range(serve.mixed_workers or 0)]
    return roles


def _child(name: str, module: str, *flags: list[str]) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-m", module, *(flag for part in flags for flag in part)])


def build_specs(args: argparse.Namespace, run_dir: Path, log_level: str) -> list[ChildSpec]:
    """Every child of `xllm serve`, each started with its config dataclass as flags."""
    serve = SERVE.from_namespace(args)
    bus = to_argv(ServiceConfig(run_dir=str(run_dir), log_level=log_level))
    kvstore = bool(serve.kvstore_dir)
    specs = []
    if kvstore:
        store = KVSTORE.from_namespace(args, dir=str(Path(serve.kvstore_dir).absolute()))
        specs.append(_child("kvstore", "services.kvstore", bus, to_argv(store)))
    roles = worker_roles(serve)
    engine = ENGINE.from_namespace(args)
    placement, _ = resolve_placement(serve.epd_placement, serve.epd_profile, engine.model)
    encoders = encoder_ids(placement, serve.encoder_workers, roles)
    # The scheduler reports how many of these are up: `xllm: ready` waits for all of them.
    scheduler = SCHEDULER.from_namespace(args, kvstore=kvstore, expected_workers=len(roles), epd_placement=placement)
    specs.append(_child("scheduler", "services.scheduler", bus, to_argv(scheduler)))
    engine = replace(engine, num_threads=worker_threads(engine.num_threads, len(roles) + len(encoders)))
    for instance_id, role in roles:
        worker = WORKER.from_namespace(args, instance_id=instance_id, role=role, kvstore=kvstore)
        module = "services.prefill" if role == "prefill" else "services.decode"
        specs.append(_child(instance_id, module, bus, to_argv(worker), to_argv(engine)))
    for instance_id, colocated_with in encoders:
        specs.append(_child(instance_id, "services.encoder", bus, encoder_argv(instance_id, colocated_with, engine)))
    # The gateway loads the tokenizer of the workers' model.
    gateway = GATEWAY.from_namespace(args, model=engine.model)
    specs.append(_child("gateway", "services.gateway", to_argv(gateway), bus))
    return specs


def _make_run_dir(requested: str | None) -> tuple[Path, bool]:
    if requested:
        path = Path(requested).absolute()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path, False
    base = default_ipc_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="serve-", dir=base)), True


def run_serve(args: argparse.Namespace) -> int:
    """Entry of `xllm serve`."""
    log_level = str(getattr(args, "log_level", ServiceConfig.log_level)).upper()
    logging.getLogger().setLevel(log_level)
    serve, gateway = SERVE.from_namespace(args), GATEWAY.from_namespace(args)
    children = (SCHEDULER.from_namespace(args), WORKER.from_namespace(args), KVSTORE.from_namespace(args))
    # The children's own checks, before any starts: a usage error, not a restart loop.
    problems = serve.problems() + gateway.problems() + [p for child in children for p in child.problems()]
    try:
        placement, why = resolve_placement(serve.epd_placement, serve.epd_profile, args.model)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        print(f"xllm serve: {problems[0]}", file=sys.stderr)
        return 2
    if is_multimodal_model(args.model):
        print(f"xllm: EPD placement {placement} ({why})", flush=True)
    run_dir, created = _make_run_dir(serve.run_dir)
    # The longest socket name is the gateway's tokens-<id>.sock; sun_path holds 107 bytes.
    if len(os.fsencode(run_dir)) > 60:
        print(f"xllm serve: --run-dir {run_dir} is too long for ipc socket paths (max 60 bytes)", file=sys.stderr)
        return 2
    specs = build_specs(args, run_dir, log_level)
    host = "127.0.0.1" if gateway.host in ("0.0.0.0", "", "::") else gateway.host
    url = f"http://{host}:{gateway.port}"
    launcher = Launcher(specs, run_dir, remove_run_dir=created, health_url=f"{url}/health",
                        stop_timeout_s=serve.stop_timeout)
    launcher.install_signal_handlers()
    model = args.model or "the default model (SmolLM2-135M-Instruct)"
    roles = [role for _, role in worker_roles(serve)]
    counts = ", ".join(f"{roles.count(role)} {role}" for role in ("prefill", "decode", "mixed") if role in roles)
    print(f"xllm: serving {model} at {url} with workers: {counts}; run dir {run_dir}", flush=True)
    code = launcher.run()
    print("xllm: stopped", flush=True)
    return code
