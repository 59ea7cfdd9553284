"""Where the deployment files are, and how to read a systemd unit (shared by the deploy-file tests)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SYSTEMD_DIR = REPO / "deploy" / "systemd"
UNITS = ["xllm-scheduler.service", "xllm-gateway.service", "xllm-kvstore.service", "xllm-worker@.service",
         "xllm-encoder@.service"]
# Units xllm.target does not start by default (the encoder: only with a multimodal model).
OPTIONAL_UNITS = {"xllm-encoder@.service"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.split()]
