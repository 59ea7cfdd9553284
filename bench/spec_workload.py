"""Repetitive prompts for speculative decoding: code to edit and text to summarise, which a model
answers largely by copying spans of its prompt (the workloads where draft-free speculation pays)."""

from __future__ import annotations

import random

__all__ = ["repetitive_prompts", "WORKLOADS"]

WORKLOADS = ("random", "repetitive")

_NAMES = ["total", "count", "items", "value", "result", "index", "buffer", "offset", "limit", "scale",
          "record", "window", "weight", "score", "queue"]
_OPS = ["+", "-", "*"]
_FACTS = [
    "The river rises in the northern hills and flows south for two hundred kilometres.",
    "Its valley holds three towns, each with a market on a different day of the week.",
    "The oldest bridge was built of stone in the twelfth century and still carries traffic.",
    "Farmers along the banks grow barley, apples and a little wine on the southern slopes.",
    "In spring the water is high and cold; in late summer it can be crossed on foot.",
    "A railway follows the river for most of its length and stops at every town.",
    "The largest town has a university founded by merchants who traded wool and salt.",
    "Floods in the last century led to dikes, reservoirs and a warning system of sirens.",
]


def _function(rng: random.Random, index: int) -> str:
    a, b, c = rng.sample(_NAMES, 3)
    op = rng.choice(_OPS)
    return (f"def update_{a}_{index}({a}, {b}):\n"
            f"    {c} = {a} {op} {b}\n"
            f"    if {c} > {rng.randrange(10, 99)}:\n"
            f"        {c} = {c} // {rng.randrange(2, 9)}\n"
            f"    return {c}\n")


def _code_edit(rng: random.Random, approx_chars: int) -> str:
    code = ""
    i = 0
    while len(code) < approx_chars:
        code += _function(rng, i) + "\n"
        i += 1
    old, new = rng.sample(_NAMES, 2)
    return (f"Here is a Python module:\n\n{code}\nRewrite the whole module, unchanged except that every "
            f"variable called {old} is renamed to {new}. Output only the code.\n\n")


def _summary(rng: random.Random, approx_chars: int) -> str:
    text = ""
    while len(text) < approx_chars:
        text += rng.choice(_FACTS) + " "
    return (f"Read the text below, then repeat its key sentences word for word as a summary.\n\n"
            f"Text: {text.strip()}\n\nSummary:")


def repetitive_prompts(n: int, approx_chars: int, seed: int) -> list[str]:
    """``n`` prompts, alternately code editing and summarising, each about ``approx_chars`` long."""
    rng = random.Random(seed)
    return [(_code_edit if i % 2 == 0 else _summary)(rng, approx_chars) for i in range(n)]
