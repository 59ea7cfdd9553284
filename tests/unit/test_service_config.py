"""Service addresses, config files under flags, and the launcher's command lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from xllm.cli import add_engine_arguments
from xllm.launcher import add_serve_arguments, build_specs, engine_flags, worker_threads
from common.service_config import (
    ServiceAddresses,
    add_service_arguments,
    addresses_from_args,
    load_config_file,
    parse_args_with_config,
)
from common.bus import advertised_address


def service_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svc")
    add_engine_arguments(parser)
    add_service_arguments(parser)
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
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
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_flags_are_forwarded_only_when_set() -> None:
    assert engine_flags(serve_args()) == []
    forwarded = engine_flags(serve_args("--kv-cache-memory", "64MiB", "--no-prefix-cache", "--max-num-seqs", "4",
                                        "--threads", "3"))
    assert forwarded == ["--kv-cache-memory", "64MiB", "--max-num-seqs", "4", "--no-prefix-cache"]


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


def test_advertised_address() -> None:
    assert advertised_address("ipc:///run/kv.sock") == "ipc:///run/kv.sock"
    assert advertised_address("tcp://10.0.0.5:5561") == "tcp://10.0.0.5:5561"
    assert advertised_address("tcp://0.0.0.0:5561", "worker-3") == "tcp://worker-3:5561"
    assert not advertised_address("tcp://0.0.0.0:5561").startswith("tcp://0.0.0.0")
