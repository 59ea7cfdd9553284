"""Service addresses, config files under flags, settings declared once, and the launcher's command lines."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from common.engine.config import EngineConfig, add_engine_arguments, engine_config_from_args
from common.service_config import (
    ServiceAddresses,
    ServiceConfig,
    add_service_arguments,
    addresses_from_args,
    load_config_file,
    parse_args_with_config,
)
from common.settings import Section, SettingsParser, from_namespace, setting, settings_of, to_argv
from common.bus import advertised_address
from services.gateway.config import GatewayConfig
from services.gateway.config import build_parser as gateway_parser
from services.kvstore.config import KvStoreConfig
from services.kvstore.config import build_parser as kvstore_parser
from services.scheduler.config import SchedulerConfig
from services.scheduler.config import build_parser as scheduler_parser
from services.worker.config import WorkerConfig
from services.worker.config import build_parser as worker_parser
from xllm.launcher import _all_workers_up
from xllm.serve import add_serve_arguments, build_specs, worker_threads


def service_parser() -> SettingsParser:
    parser = SettingsParser(prog="svc")
    add_engine_arguments(parser)
    add_service_arguments(parser)
    parser.add_settings(SchedulerConfig, only=("heartbeat_timeout",))
    return parser


def test_addresses_from_run_dir(tmp_path: Path) -> None:
    addrs = ServiceAddresses.from_run_dir(tmp_path)
    assert addrs.frontend == f"ipc://{tmp_path}/frontend.sock"
    assert addrs.backend == f"ipc://{tmp_path}/backend.sock"
    assert addrs.control == f"ipc://{tmp_path}/control.sock"
    assert addrs.tokens_addr("gw-1") == f"ipc://{tmp_path}/tokens-gw-1.sock"
    # Ids come from flags and peers: nothing may escape the run dir.
    assert addrs.kv_addr("../../etc/x") == f"ipc://{tmp_path}/kv-.._.._etc_x.sock"


def test_explicit_addresses_win_over_run_dir(tmp_path: Path) -> None:
    args = service_parser().parse_args(["--frontend-addr", "tcp://h:1", "--backend-addr", "tcp://h:2",
                                        "--control-addr", "tcp://h:3"])
    addrs = addresses_from_args(args)
    assert (addrs.frontend, addrs.backend, addrs.control, addrs.run_dir) == ("tcp://h:1", "tcp://h:2", "tcp://h:3",
                                                                             None)
    assert addrs.kv_addr("w0") == "tcp://127.0.0.1:0"
    args = service_parser().parse_args(["--run-dir", str(tmp_path), "--frontend-addr", "tcp://h:1"])
    addrs = addresses_from_args(args)
    assert addrs.frontend == "tcp://h:1" and addrs.backend == f"ipc://{tmp_path}/backend.sock"


def test_json_config_under_flags(tmp_path: Path) -> None:
    config = tmp_path / "svc.json"
    config.write_text('{"run-dir": "/x", "heartbeat_timeout": 5, "kv_cache_memory": "1GiB", "no-prefix-cache": true}')
    args = parse_args_with_config(service_parser(), ["--config", str(config), "--run-dir", "/from-flag"])
    assert args.run_dir == "/from-flag"  # the flag wins
    assert args.heartbeat_timeout == 5.0 and isinstance(args.heartbeat_timeout, float)
    assert args.kv_cache_memory == "1GiB"
    assert args.enable_prefix_cache is False


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "svc.toml"
    config.write_text('run_dir = "/toml"\nmax_num_seqs = 4\nenable_prefix_cache = false\nlog_level = "INFO"\n')
    args = parse_args_with_config(service_parser(), [f"--config={config}"])
    assert (args.run_dir, args.max_num_seqs, args.enable_prefix_cache, args.log_level) == ("/toml", 4, False, "INFO")


@pytest.mark.parametrize("content, message", [
    ('{"no_such_flag": 1}', "unknown setting"),
    ('{"max_num_seqs": "many"}', "max_num_seqs"),
    ('{"no_prefix_cache": "yes"}', "true or false"),
    ("[1, 2]", "top level"),
    ("{not json", "not valid"),
])
def test_bad_config_is_a_clear_usage_error(tmp_path: Path, capsys, content: str, message: str) -> None:
    config = tmp_path / "bad.json"
    config.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_args_with_config(service_parser(), ["--config", str(config)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.toml")


def serve_args(*argv: str) -> argparse.Namespace:
    parser = SettingsParser()
    add_engine_arguments(parser)
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags a worker is given (the launcher sets --threads itself)."""
    return to_argv(replace(engine_config_from_args(args), num_threads=None))


def test_engine_flags_are_forwarded_only_when_set() -> None:
    assert engine_flags(serve_args()) == []
    forwarded = engine_flags(serve_args("--kv-cache-memory", "64MiB", "--no-prefix-cache", "--max-num-seqs", "4",
                                        "--threads", "3"))
    assert forwarded == ["--kv-cache-memory", "64MiB", "--max-num-seqs", "4", "--no-prefix-cache"]
    assert engine_config_from_args(serve_args("--threads", "3")) == EngineConfig(num_threads=3)


def test_worker_threads_split_the_cpus() -> None:
    assert worker_threads(5, 2) == 5
    assert worker_threads(None, 1000) == 1
    assert worker_threads(None, 1) >= 1


def test_build_specs(tmp_path: Path) -> None:
    args = serve_args("--workers", "2", "--port", "9001", "--model", "/m.gguf", "--api-key", "k", "--threads", "1")
    specs = build_specs(args, tmp_path, "INFO")
    assert [s.name for s in specs] == ["scheduler", "worker-0", "worker-1", "gateway"]
    for spec in specs:
        assert spec.argv[0] == sys.executable
        assert spec.argv[spec.argv.index("--run-dir") + 1] == str(tmp_path)
    worker = specs[2].argv
    assert worker[2] == "services.decode" and "--instance-id" in worker and "worker-1" in worker
    assert worker[worker.index("--model") + 1] == "/m.gguf" and worker[worker.index("--threads") + 1] == "1"
    gateway = specs[3].argv
    assert gateway[2] == "services.gateway"
    assert gateway[gateway.index("--port") + 1] == "9001" and gateway[gateway.index("--api-key") + 1] == "k"
    assert gateway[gateway.index("--model") + 1] == "/m.gguf"


def test_the_scheduler_expects_every_worker_serve_starts(tmp_path: Path) -> None:
    def expected(*argv: str) -> int | None:
        scheduler = build_specs(serve_args(*argv), tmp_path, "INFO")[0].argv
        flags = scheduler_parser().parse_args(scheduler[3:])
        return from_namespace(SchedulerConfig, flags).expected_workers

    assert expected() == 1
    assert expected("--prefill-workers", "1", "--decode-workers", "2", "--mixed-workers", "1") == 4
    assert SchedulerConfig().expected_workers is None  # by hand, compose, systemd: nothing to wait for
    assert SchedulerConfig(expected_workers=-1).problems() == ["--expected-workers must be >= 0"]


def test_the_launcher_is_ready_once_every_expected_worker_is_up() -> None:
    assert not _all_workers_up(b'{"status": "ok", "workers_up": 1, "workers_expected": 3}')
    assert _all_workers_up(b'{"status": "ok", "workers_up": 3, "workers_expected": 3}')
    # Nothing expected (or a gateway that does not say): the first 200 is ready, as before.
    assert _all_workers_up(b'{"status": "ok", "workers_up": 1, "workers_expected": null}')
    assert _all_workers_up(b'{"status": "ok"}') and _all_workers_up(b"not json")


def test_advertised_address() -> None:
    assert advertised_address("ipc:///run/kv.sock") == "ipc:///run/kv.sock"
    assert advertised_address("tcp://10.0.0.5:5561") == "tcp://10.0.0.5:5561"
    assert advertised_address("tcp://0.0.0.0:5561", "worker-3") == "tcp://worker-3:5561"
    assert not advertised_address("tcp://0.0.0.0:5561").startswith("tcp://0.0.0.0")


# ------------------------------------------------------------------ settings declared once

def test_flags_come_from_the_dataclass() -> None:
    by_name = {s.name: s for s in settings_of(EngineConfig)}
    assert [s.name for s in settings_of(EngineConfig)] == [
        "model", "dtype", "kv_dtype", "page_size", "kv_cache_memory", "kv_cache_fraction", "max_num_seqs",
        "max_num_batched_tokens", "max_model_len", "enable_prefix_cache", "device", "cuda_graphs", "num_threads",
        "w8a8_prompts", "prompt_w8a8_layers",
        "weight_cache", "weight_cache_dir", "ep_ranks", "eplb_redundant_experts", "eplb_interval_steps",
        "expert_load_window_steps", "speculative_method", "num_speculative_tokens", "ngram_min", "ngram_max",
        "suffix_max_depth", "suffix_global", "suffix_global_requests", "suffix_min_prob", "overlap_schedule",
        "overlap_min_batch"]
    assert (by_name["kv_dtype"].flag, by_name["speculative_method"].flag) == ("--kv-cache-dtype",
                                                                              "--speculative-method")
    assert (by_name["weight_cache"].flag, by_name["weight_cache"].kind) == ("--no-weight-cache", "switch_off")
    assert (by_name["num_threads"].flag, by_name["num_threads"].parse) == ("--threads", int)
    assert (by_name["enable_prefix_cache"].flag, by_name["enable_prefix_cache"].kind) == ("--no-prefix-cache",
                                                                                          "switch_off")
    assert by_name["kv_cache_fraction"].parse is float and by_name["kv_cache_memory"].parse is str
    # Today's spellings keep working, and each lands on the dataclass field.
    args = service_parser().parse_args(["--threads", "2", "--no-prefix-cache", "--page-size", "32"])
    config = engine_config_from_args(args)
    assert (config.num_threads, config.enable_prefix_cache, config.page_size) == (2, False, 32)
    store = from_namespace(KvStoreConfig, kvstore_parser().parse_args(
        ["--dir", "/d", "--dram-bytes", "2GiB", "--no-sync", "--namespace", "a", "--namespace", "b"]))
    assert (store.dram_bytes, store.no_sync, store.namespace) == (2 << 30, True, ["a", "b"])
    assert from_namespace(SchedulerConfig, scheduler_parser().parse_args(["--kvstore"])).kvstore is True


def test_a_bool_defaulting_to_true_needs_its_off_flag() -> None:
    @dataclass
    class Bad:
        on: bool = setting(True, "x")

    with pytest.raises(TypeError, match="turns it off"):
        settings_of(Bad)


@pytest.mark.parametrize("key", ["threads", "--threads", "num_threads", "num-threads"])
def test_config_keys_are_flags_or_fields(tmp_path: Path, key: str) -> None:
    config = tmp_path / "svc.json"
    config.write_text(f'{{"{key}": 3}}')
    assert parse_args_with_config(service_parser(), ["--config", str(config)]).num_threads == 3


def test_a_required_setting_may_come_from_the_config_file(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args_with_config(kvstore_parser(), [])
    assert "--dir" in capsys.readouterr().err
    config = tmp_path / "kv.toml"
    config.write_text('dir = "/data"\ndram-bytes = "2GiB"\nno_sync = true\nnamespace = "tenant"\n')
    store = from_namespace(KvStoreConfig, parse_args_with_config(kvstore_parser(), ["--config", str(config)]))
    assert (store.dir, store.dram_bytes, store.no_sync, store.namespace) == ("/data", 2 << 30, True, ["tenant"])
    config.write_text('dram_bytes = "lots"\n')
    with pytest.raises(SystemExit):
        parse_args_with_config(kvstore_parser(), ["--config", str(config), "--dir", "/d"])
    assert "dram_bytes" in capsys.readouterr().err


@pytest.mark.parametrize("config", [
    EngineConfig(model="/m", page_size=32, kv_cache_memory="1GiB", enable_prefix_cache=False, num_threads=2),
    ServiceConfig(run_dir="/r", frontend_addr="tcp://h:1", curve_dir="/k", log_level="INFO"),
    SchedulerConfig(pd_policy="dynamic", ttft_slo_ms=500.0, kvstore=True, kvstore_events_addr="tcp://k:2"),
    WorkerConfig(instance_id="w", role="prefill", heartbeat_interval=0.25, kvstore=True),
    GatewayConfig(host="0.0.0.0", port=9000, api_key="k", max_queue=4, max_model_len=128),
    KvStoreConfig(dir="/d", dram_bytes=1 << 20, no_sync=True, namespace=["a", "b"]),
])
def test_to_argv_parses_back_to_the_config(config) -> None:
    parser = SettingsParser()
    parser.add_settings(type(config))
    argv = to_argv(config)
    assert from_namespace(type(config), parser.parse_args(argv)) == config
    assert to_argv(type(config)()) == []  # defaults are never spelt out


def _child_configs(argv: list[str]) -> dict[type, object]:
    """Parse a child's command line with the child's own parser, as the child will."""
    module, flags = argv[2], argv[3:]
    parser = {"services.scheduler": scheduler_parser, "services.gateway": gateway_parser,
              "services.kvstore": kvstore_parser, "services.decode": lambda: worker_parser("decode"),
              "services.prefill": lambda: worker_parser("prefill")}[module]()
    args = parser.parse_args(flags)
    classes = (ServiceConfig, SchedulerConfig, WorkerConfig, GatewayConfig, KvStoreConfig, EngineConfig)
    # The classes whose settings this child's parser holds (the gateway has no EngineConfig).
    held = {dest for _, _, dest in parser.settings()}
    return {cls: from_namespace(cls, args) for cls in classes
            if {dest for _, _, dest in Section(cls).entries()} <= held}


def test_children_parse_what_the_launcher_meant(tmp_path: Path) -> None:
    args = serve_args("--prefill-workers", "1", "--decode-workers", "1", "--pd-policy", "dynamic",
                      "--ttft-slo-ms", "900", "--kvstore-dir", "kv", "--kvstore-dram", "2GiB",
                      "--kvstore-timeout", "0.5", "--kv-transfer-timeout", "3", "--host", "0.0.0.0",
                      "--max-queue", "8", "--model", "/m.gguf", "--page-size", "32", "--threads", "2")
    specs = {spec.name: _child_configs(spec.argv) for spec in build_specs(args, tmp_path, "INFO")}
    assert list(specs) == ["kvstore", "scheduler", "prefill-0", "decode-0", "gateway"]
    for configs in specs.values():
        assert configs[ServiceConfig] == ServiceConfig(run_dir=str(tmp_path), log_level="INFO")
    assert specs["kvstore"][KvStoreConfig] == KvStoreConfig(dir=str(Path("kv").absolute()), dram_bytes=2 << 30)
    # expected_workers: the scheduler reports how many of the two workers are up.
    assert specs["scheduler"][SchedulerConfig] == SchedulerConfig(pd_policy="dynamic", ttft_slo_ms=900.0, kvstore=True,
                                                                  expected_workers=2)
    for name, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        assert specs[name][WorkerConfig] == WorkerConfig(instance_id=name, role=role, kv_transfer_timeout=3.0,
                                                         kvstore=True, kvstore_timeout=0.5)
        assert specs[name][EngineConfig] == EngineConfig(model="/m.gguf", page_size=32, num_threads=2)
    assert specs["gateway"][GatewayConfig] == GatewayConfig(host="0.0.0.0", max_queue=8, model="/m.gguf")


def test_no_module_reads_argparse_internals() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in [*root.joinpath("common").rglob("*.py"), *root.joinpath("xllm").rglob("*.py"),
                 *root.joinpath("services").rglob("*.py")]:
        assert "._actions" not in path.read_text(), path


def test_prompt_w8a8_layers_parse_and_reject_unknown_names() -> None:
    assert EngineConfig().prompt_w8a8_set() == {"gate_up_proj"}
    assert EngineConfig(prompt_w8a8_layers="").prompt_w8a8_set() == frozenset()
    assert EngineConfig(prompt_w8a8_layers=" down_proj , qkv_proj").prompt_w8a8_set() == {"down_proj", "qkv_proj"}
    with pytest.raises(ValueError, match="gate_up"):
        EngineConfig(prompt_w8a8_layers="gate_up").prompt_w8a8_set()
    args = service_parser().parse_args(["--prompt-w8a8-layers", "o_proj"])
    assert engine_config_from_args(args).prompt_w8a8_layers == "o_proj"
