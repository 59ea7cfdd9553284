"""`xllm bench quality`: what the fast numeric paths cost in accuracy, against fp32.

Teacher-forced over a text file: the model is loaded once per mode (fp32 reference, plain bf16,
bf16 + weight-only int8, bf16 + W8A8, the engine's prompt path (bf16 but for the W8A8 layers it
keeps there), and the int8 KV cache on plain bf16 and on W8A8), the text
is prefilled in chunks through the paged KV cache (every chunk attends to the pages written
before it, so an int8 cache's rounding reaches every later token), and each mode reports perplexity, top-1 agreement with fp32 and KL(fp32 || mode) per
token. Chunks of 4 tokens exercise the small-batch (weight-only int8) path, larger chunks the
GEMM path, as in serving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common.default_model import default_model_path
from common.engine.config import EngineConfig
from common.progress import add_progress_argument, progress_bar
from kernels.linear import bf16_gemms, mark_prompt_w8a8

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "measure", "MODES", "Mode"]

_README = Path(__file__).resolve().parents[1] / "README.md"

_PLAIN = {"XLLM_INT8_DECODE": "0", "XLLM_INT8_GEMM": "0"}
_W8A8 = {"XLLM_INT8_DECODE": "0", "XLLM_INT8_GEMM": "1"}

_PROMPT_LAYERS = EngineConfig().prompt_w8a8_set()  # the engine's default prompt path


class Mode(NamedTuple):
    dtype: torch.dtype
    env: dict[str, str]  # the int8 switches read when the model loads
    chunk: int  # prefill chunk: <= 4 rows take the small-batch kernels
    kv_dtype: torch.dtype | None = None  # None: the model's dtype
    # Scored as prompt tokens are (inside bf16_gemms), these W8A8 layers marked to stay int8.
    prompt_w8a8: frozenset[str] | None = None


MODES: dict[str, Mode] = {
    "fp32": Mode(torch.float32, {}, 256, None),
    "bf16": Mode(torch.bfloat16, _PLAIN, 256, None),
    # <=4 rows: a GGUF's own 4-bit / Q8_0 blocks (kernels.q4_pack, q8_pack) where it has them, or int8 copies
    "bf16+q4-weights (<=4 rows)": Mode(torch.bfloat16, {"XLLM_INT8_DECODE": "1", "XLLM_INT8_GEMM": "0"}, 4, None),
    "bf16+int8-weights (<=4 rows)": Mode(torch.bfloat16, {"XLLM_INT8_DECODE": "1", "XLLM_INT8_GEMM": "0",
                                                      "XLLM_Q4_DECODE": "0", "XLLM_Q8_HEAD": "0"}, 4, None),
    "bf16+w8a8 (>4 rows)": Mode(torch.bfloat16, _W8A8, 256, None),
    # What the engine runs on prompt tokens: bf16 GEMMs but for --prompt-w8a8-layers (kernels/linear.py)
    "prompts (bf16, W8A8 gate_up)": Mode(torch.bfloat16, _W8A8, 256, None, _PROMPT_LAYERS),
    "bf16+int8-kv": Mode(torch.bfloat16, _PLAIN, 256, torch.int8),
    "bf16+w8a8+int8-kv": Mode(torch.bfloat16, _W8A8, 256, torch.int8),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=str(_README), help="text file to score (default: this repo's README)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--plot", dest="png_path", default=None, metavar="PNG",
                   help="draw KL, top-1 agreement and perplexity per path into this PNG")
    add_progress_argument(p)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in ``os.environ`` while inside (the int8 switches are read when a model loads)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _logits(path: str, mode: Mode, ids: list[int]) -> torch.Tensor:
    from common.models.registry import load_model

    with environment(mode.env):
        model, _ = load_model(path, dtype=mode.dtype)
    if mode.prompt_w8a8 is None:
        return model.score(ids, chunk_size=mode.chunk, kv_dtype=mode.kv_dtype)
    mark_prompt_w8a8(model, mode.prompt_w8a8)
    with bf16_gemms():
        return model.score(ids, chunk_size=mode.chunk, kv_dtype=mode.kv_dtype)


def run(args: argparse.Namespace) -> int:
    """Score every mode; prints a table, writes ``--json``; exit status 0."""
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> dict:
    """The report: per mode perplexity, top-1 agreement with fp32 and KL from fp32."""
    from common.tokenizer import load_tokenizer

    path = args.model or str(default_model_path())
    ids = load_tokenizer(path).encode(Path(args.text).read_text(encoding="utf-8"))[: args.max_tokens]
    if len(ids) < 2:
        raise SystemExit(f"{args.text}: fewer than 2 tokens to score")
    target = torch.tensor(ids[1:])
    ref = None
    results = {}
    with progress_bar(len(MODES), "quality", "mode", args=args) as bar:
        for name, mode in MODES.items():
            bar.set_postfix_str(name)
            logits = _logits(path, mode, ids)[:-1]
            bar.update(1)
            if ref is None:
                ref = logits
            logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
            results[name] = {
                "perplexity": float(torch.exp(F.cross_entropy(logits, target))),
                "top1_agreement_with_fp32": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                "kl_from_fp32": float(F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")),
            }
            r = results[name]
            bar.write(f"{name:30s} perplexity {r['perplexity']:8.3f}  top-1 agreement "
                      f"{r['top1_agreement_with_fp32']:.4f}  KL {r['kl_from_fp32']:.5f}", file=sys.stdout)
    report = {"model": path, "text": args.text, "tokens": len(ids), "modes": results}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    if getattr(args, "png_path", None):
        from bench.plots import quality_plot  # matplotlib is only imported when a plot is asked for

        quality_plot(args.png_path, report)
        print(f"plot written to {args.png_path}")
    return report
