"""The inference engine: ``from common.engine import LLM, SamplingParams``.

Names are resolved lazily so importing a light submodule (the block manager, say) does not
load the model stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "common.engine.llm",
    "RequestOutput": "common.engine.llm",
    "CompletionOutput": "common.engine.llm",
    "BeamSearchOutput": "common.engine.llm",
    "BeamSequence": "common.engine.llm",
    "LLMEngine": "common.engine.engine",
    "SequenceOutput": "common.engine.engine",
    "EngineConfig": "common.engine.config",
    "SamplingParams": "common.engine.sampling_params",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'common.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
