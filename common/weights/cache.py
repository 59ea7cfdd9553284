"""On-disk cache of a loaded model: the dequantized weights and the int8 copies, scales and
SmoothQuant factors that packing and calibration derive from them.

A restarted worker would otherwise parse the GGUF again, dequantize every tensor, quantize every
linear to int8 and run a calibration prefill: seconds of work whose result never changes for the
same file and settings. One entry is one ``safetensors`` file named by a key that covers
everything the result depends on (see :func:`cache_key`): the model file's identity (size, mtime
and a hash of a few MiB: a full sha256 of a 100 MB file costs time too), the dtype, the int8
settings, the library versions, the CPU and this module's format version.

Entries are written atomically (a temporary file, then ``os.replace``), so a reader sees a whole
entry or none. A damaged or stale entry (bad header, a key that does not match, a checksum that
does not match) is logged once, removed and rebuilt by the caller: never a crash, never wrong
numbers (the checksum covers every tensor byte).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CachedModel", "WeightCache", "cache_key", "default_cache_dir", "model_fingerprint"]

# Bump whenever what is stored, or how it is computed (packing, quantization, calibration), changes.
FORMAT_VERSION = 1
# Bytes hashed at the start, middle and end of a model file: cheap, and catches a file rewritten
# in place with the same size and a restored mtime.
_SAMPLE_BYTES = 1 << 20
_KEEP_PER_MODEL = 3  # entries kept per model file name (other dtypes / settings); older ones go
_STALE_TMP_S = 3600.0
_STATE, _INT8 = "state/", "int8/"


def default_cache_dir() -> Path:
    """``weights`` under xllm's cache root (as the tokenizer cache's): ``$XLLM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/xllm``, else ``~/.cache/xllm``."""
    root = os.environ.get("XLLM_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xllm")
    return Path(root) / "weights"


def _sample_hash(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """The identity of a model file (or of every file of an HF directory): resolved path, sizes,
    mtimes and sampled hashes. Raises ``OSError`` when it cannot be read."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    entries = []
    for file in files:
        st = file.stat()
        entries.append([file.name, st.st_size, st.st_mtime_ns, _sample_hash(file, st.st_size)])
    return {"path": str(path), "files": entries}


def cache_key(fingerprint: dict[str, Any], options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(hex digest, the fields it hashes): the model's identity, ``options`` (everything else the
    loaded result depends on) and the versions of what computes it."""
    from importlib.metadata import version  # gguf's: its dequantization defines the weights

    fields = {
        "format": FORMAT_VERSION,
        "model": fingerprint,
        "options": options,
        "torch": torch.__version__,
        "gguf": version("gguf"),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


@dataclass
class CachedModel:
    """What one entry holds: the HF config dict, the state dict the model is built from, the
    int8 state of each packed linear (by module name) and free-form facts (``meta``)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    int8: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = {_STATE + name: t for name, t in self.state.items()}
        for module, parts in self.int8.items():
            for part, t in parts.items():
                flat[f"{_INT8}{module}/{part}"] = t
        return flat


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of every tensor's bytes, in name order (~0.2 s per 500 MB)."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.numel():
            crc = zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class WeightCache:
    """Entries under one directory; nothing here raises on a bad entry or an unwritable disk."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def path_for(self, digest: str, model_path: str | Path) -> Path:
        return self.directory / f"{Path(model_path).name}-{digest[:24]}.safetensors"

    def load(self, digest: str, fields: dict[str, Any], model_path: str | Path) -> CachedModel | None:
        """The entry for ``digest``, or None when there is none or it is unusable (removed then)."""
        path = self.path_for(digest, model_path)
        if not path.is_file():
            return None
        try:
            return self._read(path, fields)
        except Exception as exc:  # any damage: rebuild rather than fail the start
            logger.warning("ignoring weight cache entry %s (%s); rebuilding it", path, exc)
            _unlink(path)
            return None

    def _read(self, path: Path, fields: dict[str, Any]) -> CachedModel:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("xllm_key", "null")) != fields:
                raise ValueError("its key does not match (stale entry)")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if _checksum(tensors) != meta.get("xllm_crc32"):
            raise ValueError("checksum mismatch (damaged entry)")
        state: dict[str, torch.Tensor] = {}
        int8: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith(_STATE):
                state[name[len(_STATE):]] = t
            elif name.startswith(_INT8):
                module, _, part = name[len(_INT8):].rpartition("/")
                int8.setdefault(module, {})[part] = t
            else:
                raise ValueError(f"unexpected tensor {name!r}")
        return CachedModel(json.loads(meta["xllm_config"]), state, int8, json.loads(meta.get("xllm_meta", "{}")))

    def store(self, digest: str, fields: dict[str, Any], model_path: str | Path, entry: CachedModel) -> Path | None:
        """Write ``entry`` atomically; returns its path, or None (logged) when it cannot be written."""
        from safetensors.torch import save_file

        path = self.path_for(digest, model_path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tensors = {name: t.detach().contiguous() for name, t in entry.tensors().items()}
            metadata = {
                "xllm_key": json.dumps(fields, sort_keys=True),
                "xllm_config": json.dumps(entry.config),
                "xllm_meta": json.dumps(entry.meta),
                "xllm_crc32": _checksum(tensors),
            }
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except Exception as exc:  # a full or read-only disk must not stop the worker
            logger.warning("cannot write weight cache entry %s (%s)", path, exc)
            _unlink(tmp)
            return None
        self._prune(Path(model_path).name, keep=path)
        return path

    def _prune(self, model_name: str, keep: Path) -> None:
        """Keep the newest entries of this model file; drop abandoned temporary files."""
        now = time.time()
        entries = []
        for p in self.directory.glob(f"{model_name}-*.safetensors"):
            try:
                entries.append((p.stat().st_mtime, p))
            except OSError:
                continue
        entries.sort(reverse=True)
        for _mtime, p in entries[_KEEP_PER_MODEL:]:
            if p != keep:
                _unlink(p)
        for p in self.directory.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    _unlink(p)
            except OSError:
                continue


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
