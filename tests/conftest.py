"""Shared fixtures: the default model, loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores, several processes: keep each test process from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the Triton kernels are tested in triton's CPU interpreter. It must be chosen before
# anything imports triton (transformers does, at import): triton decorates its own library
# functions then, and interpreted kernels cannot call compiled ones (tests/unit/_triton_env.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from common.models.registry import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm(smollm_path):
    """The offline engine on the default model, fp32 (the dtype the transformers comparisons use)."""
    from common.engine import LLM

    return LLM(smollm_path, dtype="float32", kv_cache_memory="96MiB", max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' own loading of the same GGUF, fp32."""
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(smollm_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_vl_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL HF directory (config, safetensors, tokenizer.json, chat template,
    preprocessor_config.json) that ``xllm serve --model DIR`` serves as is (tests/unit/_vl_model.py)."""
    from tests.unit._vl_model import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))
