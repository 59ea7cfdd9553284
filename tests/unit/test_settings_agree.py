"""One definition per setting: every place that names a service's setting agrees with it.

Every flag of every service is a field of a config dataclass (`common.settings`). Its name and
default must read the same in the service's `--help`, in `xllm serve --help` (which exposes some
of them), in a `--config` file, and wherever docker-compose.yml and the systemd units restate them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from _deploy_files import COMPOSE_FILE, REPO, SYSTEMD_DIR, UNITS, parse_unit, words


def _parsers() -> dict:
    from services.encoder.config import build_parser as encoder
    from services.gateway.config import build_parser as gateway
    from services.kvstore.config import build_parser as kvstore
    from services.scheduler.config import build_parser as scheduler
    from services.worker.config import build_parser as worker

    return {"services.scheduler": scheduler, "services.gateway": gateway, "services.kvstore": kvstore,
            "services.decode": lambda: worker("decode"), "services.prefill": lambda: worker("prefill"),
            "services.encoder": encoder}


PARSERS = _parsers()


def _help_of(*command: str) -> dict[str, str]:
    """`--help` of a command as {flag: its help text}, printed wide so that nothing wraps."""
    env = {**os.environ, "COLUMNS": "4000"}
    proc = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries: dict[str, str] = {}
    last = None
    for line in proc.stdout.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            flags = [part.split()[0] for part in match.group(1).split(", ")]
            last = flags[-1]
            entries[last] = match.group(2) or ""
        elif last and line.startswith("   ") and line.strip():
            entries[last] = (entries[last] + " " + line.strip()).strip()
        else:
            last = None
    return entries


@pytest.fixture(scope="module")
def helps() -> dict[str, dict[str, str]]:
    out = {module: _help_of("-m", module) for module in PARSERS}
    out["xllm serve"] = _help_of("-m", "xllm.cli", "serve")
    return out


def _expected_help(setting, default) -> str:
    return " ".join(setting.help_text(default).replace("%%", "%").split())


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_service_help_shows_each_setting_with_its_default(helps, module):
    shown = helps[module]
    for setting, flag, _ in PARSERS[module]().settings():
        assert flag in shown, f"{module} --help lacks {flag}"
        assert shown[flag] == _expected_help(setting, setting.default), (module, flag)


def test_serve_help_agrees_with_the_services(helps):
    """`xllm serve` shows the services' settings with the services' own help and default."""
    from common.engine.config import EngineConfig
    from services.gateway.config import GatewayConfig
    from services.kvstore.config import KvStoreConfig
    from services.scheduler.config import SchedulerConfig
    from services.worker.config import WorkerConfig
    from xllm.serve import ENGINE, SERVE, SERVE_SECTIONS

    owner = {EngineConfig: "services.decode", WorkerConfig: "services.decode", SchedulerConfig: "services.scheduler",
             KvStoreConfig: "services.kvstore", GatewayConfig: "services.gateway"}
    serve = helps["xllm serve"]
    for section in (ENGINE, *SERVE_SECTIONS):
        for setting, flag, _ in section.entries():
            assert flag in serve, f"xllm serve --help lacks {flag}"
            if section is SERVE:
                assert serve[flag] == _expected_help(setting, setting.default), flag
                continue
            service = helps[owner[section.cls]]
            assert serve[flag] == service[setting.flag], (flag, owner[section.cls], setting.flag)
    # Renamed: the kvstore's budgets read --kvstore-dram/--kvstore-ssd beside --kvstore-dir.
    assert serve["--kvstore-dram"] == helps["services.kvstore"]["--dram-bytes"]


@pytest.mark.parametrize("spelling", ["field", "flag"])
@pytest.mark.parametrize("module", sorted(PARSERS))
def test_config_file_takes_every_setting_by_name_with_its_default(tmp_path, module, spelling):
    """A config file that names every setting (by field or by flag) at its default changes nothing."""
    parser = PARSERS[module]()
    required = [flag for setting, flag, _ in parser.settings() if setting.required]
    config = {}
    for setting, flag, dest in parser.settings():
        key = dest if spelling == "field" else flag.lstrip("-")
        value = "/somewhere" if setting.required else setting.default
        if setting.kind in ("switch_on", "switch_off") and spelling == "flag":
            value = False  # `no-prefix-cache = false`: the flag not given
        config[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from_file = PARSERS[module]().parse_args_with_config(["--config", str(path)])
    from_flags = PARSERS[module]().parse_args([arg for flag in required for arg in (flag, "/somewhere")])
    assert vars(from_file) == {**vars(from_flags), "config": str(path)}


def _resolve_env(value: str, env: dict[str, str]) -> tuple[str, bool]:
    """A deploy file's argument with its variables at their defaults; True when one was used."""
    match = re.fullmatch(r"\$\{(\w+)(?::-(.*))?\}", value)
    if match is None:
        return value, False
    name, fallback = match.groups()
    return (fallback if fallback is not None else env[name]), True


def _deploy_args() -> list[tuple[str, str, str, str | None, bool]]:
    """(file, module, flag, value, value is a variable's default) of every flag the files pass."""
    yaml = pytest.importorskip("yaml")
    out = []

    def walk(source: str, module: str, args: list[str], env: dict[str, str]) -> None:
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if not arg.startswith("--"):
                assert arg.startswith("$"), f"{source}: stray argument {arg!r}"  # `$XLLM_*_ARGS`: extras
                continue
            flag, eq, value = arg.partition("=")
            if not eq and i < len(args) and not args[i].startswith(("--", "$XLLM")):
                value, eq = args[i], "="
                i += 1
            if eq:
                value, from_env = _resolve_env(value, env)
                out.append((source, module, flag, value, from_env))
            else:
                out.append((source, module, flag, None, False))

    for name, svc in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items():
        walk(f"docker-compose.yml:{name}", svc["command"][0], [str(a) for a in svc["command"][1:]], {})
    for unit in UNITS:
        service = parse_unit(SYSTEMD_DIR / unit)["Service"]
        env = dict(word.split("=", 1) for word in words(service.get("Environment", [])))
        argv = service["ExecStart"][0].split()
        walk(unit, argv[2], argv[3:], env)
    return out


# Where a deployment means to differ from a service's default (the value a variable falls back
# to), and why. Any other variable's fallback must be the service's own default.
DEPLOYMENT_CHOICES = {
    ("--log-level", "INFO"): "deployments log at INFO; a service started by hand stays quiet (WARNING)",
    ("--model", "/opt/xllm/default-model.gguf"): "the packaged default model at a stable path in the image",
    ("--role", "mixed"): "one worker unit/image for every role; mixed is the single-box default",
    ("--kv-cache-memory", "1GiB"): "a fixed KV pool per container, not a share of the host's free memory",
}


def test_deploy_files_use_the_services_names_and_defaults():
    used = set()
    for source, module, flag, value, from_env in _deploy_args():
        settings = {f: s for s, f, _ in PARSERS[module]().settings()}
        assert flag in settings or flag == "--config", f"{source}: {module} has no setting {flag}"
        if flag == "--config":
            continue
        setting = settings[flag]
        if value is None:
            assert setting.kind in ("switch_on", "switch_off"), f"{source}: {flag} needs a value"
            continue
        converted = setting.convert(value)  # a value the service would refuse fails here
        assert setting.choices is None or converted in setting.choices, (source, flag, value)
        if from_env and converted != setting.default:
            assert (flag, value) in DEPLOYMENT_CHOICES, (
                f"{source}: {flag} falls back to {value!r}, but {module}'s default is {setting.default!r}; "
                "restate the default or list the difference in DEPLOYMENT_CHOICES")
            used.add((flag, value))
    assert used == set(DEPLOYMENT_CHOICES), f"stale DEPLOYMENT_CHOICES: {set(DEPLOYMENT_CHOICES) - used}"
