"""`xllm serve`'s EPD part: which placement runs (`--epd-placement`, `auto` = the profiler's file)
and the encoder children it starts (`python -m services.encoder`).

Encoders run only when a multimodal model is served: with a text-only model `auto` means EP-D
(nothing to encode) and naming ED-P or E-P-D is a usage error. ED-P starts `--encoder-workers`
encoders spread over the decode workers (the mixed ones without P/D pools), each told which
worker it shares a device with; E-P-D starts them standalone.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.engine.config import EngineConfig
from common.settings import to_argv
from services.encoder.config import ENGINE_SETTINGS, EncoderConfig
from services.scheduler.epd_placement import AUTO, ED_P, EP_D, default_profile_path, read_choice

__all__ = ["is_multimodal_model", "resolve_placement", "encoder_ids", "encoder_argv"]


def is_multimodal_model(model: str | None) -> bool:
    """Whether `model` (an HF directory) has a vision tower, from its config.json alone."""
    if not model or not Path(model, "config.json").is_file():
        return False
    try:
        config = json.loads(Path(model, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def resolve_placement(requested: str, profile: str | None, model: str | None) -> tuple[str, str]:
    """(placement the scheduler runs, why); ValueError with the flag to fix when it cannot run."""
    multimodal = is_multimodal_model(model)
    if requested == AUTO:
        if not multimodal:
            return EP_D, "a text-only model: nothing to encode"
        path = Path(profile) if profile else default_profile_path(model)
        placement, reason = read_choice(path)
        return placement, f"from the profile {path}: {reason}"
    if requested != EP_D and not multimodal:
        raise ValueError(f"--epd-placement {requested} needs a multimodal model (one with a vision tower); "
                         f"{model or 'the default model'} is text-only")
    return requested, "as asked"


def encoder_ids(placement: str, count: int, worker_roles: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(encoder id, the worker it is co-located with or "") of each encoder to start."""
    if placement == EP_D or count <= 0:
        return []
    if placement == ED_P:
        hosts = [wid for wid, role in worker_roles if role == "decode"] or [wid for wid, _ in worker_roles]
        return [(f"encoder-{i}", hosts[i % len(hosts)]) for i in range(count)]
    return [(f"encoder-{i}", "") for i in range(count)]


def encoder_argv(instance_id: str, colocated_with: str, engine: EngineConfig) -> list[str]:
    """An encoder's own flags, and the engine's model/device flags it shares with the workers."""
    model = EngineConfig(**{name: getattr(engine, name) for name in ENGINE_SETTINGS})
    return to_argv(EncoderConfig(instance_id=instance_id, colocated_with=colocated_with)) + to_argv(model)
