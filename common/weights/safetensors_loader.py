"""Read an HF model directory: ``config.json`` plus every ``*.safetensors`` shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

__all__ = ["read_hf_config", "load_safetensors_dir"]

_INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(model_dir: str | Path) -> dict:
    """``config.json`` as a dict, with end-of-generation ids from ``generation_config.json``.

    Instruct checkpoints often list extra stop tokens (e.g. Llama 3's ``<|eot_id|>``) only in
    the generation config; the engine needs all of them to stop.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = json.loads(config_path.read_text())
    generation_path = model_dir / "generation_config.json"
    if generation_path.is_file():
        generation = json.loads(generation_path.read_text())
        extra = generation.get("eos_token_id")
        if extra is not None:
            ids = _id_list(config.get("eos_token_id")) + _id_list(extra)
            config["eos_token_id"] = list(dict.fromkeys(ids))
    return config


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _shard_files(model_dir: Path) -> list[Path]:
    index_path = model_dir / _INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    return files


def load_safetensors_dir(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, state dict with HF tensor names); floating tensors cast to ``dtype``."""
    model_dir = Path(model_dir)
    config = read_hf_config(model_dir)
    state: dict[str, torch.Tensor] = {}
    for shard in _shard_files(model_dir):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype=dtype)
                state[name] = tensor.to(device)
    logger.info("read %d tensors from %s", len(state), model_dir)
    return config, state
