"""Calibration of the W8A8 int8 GEMMs (SmoothQuant), run once at load time.

One prefill over a short built-in chat records each int8 linear's per-input-channel activation
maximum on the bf16 path; every layer is then smoothed from its own statistics (see
:meth:`kernels.linear.PackedLinear.smooth`). The text must be natural language in the model's
chat format: the outlier channels SmoothQuant tames show up on real text and on the special
tokens that open a turn; random token ids give statistics that make things far worse
(measured: perplexity x3.6).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from kernels.linear import PackedLinear

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_CHAT", "CALIBRATION_VERSION", "calibration_token_ids", "calibrate_int8_gemms"]

CALIBRATION_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the history of the printing press, and explain why it mattered "
                                "for science, religion and politics in Europe. Then list three inventions that "
                                "changed communication."},
    {"role": "assistant", "content": "The printing press, developed by Johannes Gutenberg around 1440, made books "
                                     "cheap and fast to produce. Ideas spread across Europe within years instead of "
                                     "decades: scientists shared results, reformers printed pamphlets, and "
                                     "governments learned to fear a free press. Three inventions that changed "
                                     "communication are the telegraph, the telephone and the internet."},
]


# Part of the weight cache's key: change it whenever the calibration text or method changes
# (a cached entry holds the smoothing computed from it).
CALIBRATION_VERSION = "chat-v1-alpha0.5"


def calibration_token_ids(model_path: str) -> list[int]:
    """The calibration chat in the model's own template (plain text when it has none)."""
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    try:
        return tokenizer.encode_chat(CALIBRATION_CHAT, add_generation_prompt=False)
    except Exception:  # no chat template: the turns as plain text
        return tokenizer.encode("\n".join(turn["content"] for turn in CALIBRATION_CHAT))


@torch.inference_mode()
def calibrate_int8_gemms(model: nn.Module, token_ids: list[int]) -> int:
    """Smooth every W8A8 linear of ``model`` from one prefill of ``token_ids``; returns the count."""
    linears = [m for m in model.modules() if isinstance(m, PackedLinear) and m.w8a8]
    if not linears or not token_ids:
        return 0
    start = time.perf_counter()
    maxima: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        seen = x.float().abs().amax(dim=0)
        prev = maxima.get(id(module))
        maxima[id(module)] = seen if prev is None else torch.maximum(prev, seen)

    hooks = [m.register_forward_hook(record) for m in linears]
    for m in linears:
        m.w8a8 = False  # statistics of the unquantized activations
    try:
        model.score(token_ids, chunk_size=len(token_ids))
    finally:
        for m in linears:
            m.w8a8 = True
        for hook in hooks:
            hook.remove()
    smoothed = 0
    for m in linears:
        if id(m) in maxima:
            m.smooth(maxima[id(m)])
            smoothed += 1
    logger.info("smoothed %d int8 GEMMs from %d calibration tokens in %.2fs", smoothed, len(token_ids),
                time.perf_counter() - start)
    return smoothed
