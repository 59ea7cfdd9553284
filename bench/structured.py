"""Cost of structured outputs per engine step, at 1 and 16 constrained streams (writes JSON).

``python -m bench.structured [--out results/structured.json] [--engine] [--compare]``

* masks: the engine's own path without the model (``GrammarMasker`` + ``apply_token_mask`` on
  the default model's tokenizer), walking a fixed JSON document token by token: mask fill
  (llguidance, on the masker's thread), the wait for it, the vectorised apply on ``[B, V]``
  logits, and the matchers' advance, per step.
* ``--engine``: the offline engine on the default model, B streams decoding under a JSON schema
  vs B free streams (same prompts, greedy): mean step time, and the masker's exposed wait.
* ``--compare``: llguidance vs xgrammar on the same schema (xgrammar only if importable; it is
  not a dependency): compile time and mask time per step (the comparison in
  ``common/engine/grammar.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from common.engine.grammar import GrammarTokenizer
from common.engine.grammar_mask import GrammarMasker
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import Sequence
from common.engine.token_mask import apply_token_mask
from common.models.registry import default_model_path
from common.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "address": {"$ref": "#/$defs/address"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "email", "tags", "address", "status"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {
        "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "zip"], "additionalProperties": False}},
}
DOC = {"name": "Ann Lee", "age": 42, "email": "ann@example.com", "tags": ["a", "bb"],
       "address": {"street": "Main St 1", "zip": "12345"}, "status": "active", "score": 1.5}
VOCAB = 49152


def bench_masks(streams: int, hf: Any, gtok: GrammarTokenizer, device: str = "cpu") -> dict[str, float]:
    """Per-step mask cost on the engine's path (no model): fill, wait, apply, advance."""
    doc_ids = hf.encode(json.dumps(DOC), add_special_tokens=False)
    params = SamplingParams(temperature=0.0, structured_kind="json_schema", structured_spec=json.dumps(SCHEMA))
    masker = GrammarMasker("", gtok.vocab_size, [], tokenizer=gtok)
    seqs = [Sequence(request_id=f"b{i}", prompt_ids=[1], params=params, max_tokens=len(doc_ids) + 1)
            for i in range(streams)]
    t0 = time.perf_counter()
    for seq in seqs:
        masker.ensure_state(seq)
    setup = time.perf_counter() - t0
    logits = torch.randn(streams, gtok.vocab_size, device=device)
    apply_s = advance_s = 0.0
    for token in doc_ids:
        mask = masker.wait(masker.start(seqs))
        t1 = time.perf_counter()
        apply_token_mask(logits, mask)
        if logits.is_cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        masker.advance(seqs, [token] * streams)
        for seq in seqs:
            seq.token_ids.append(token)
        advance_s += time.perf_counter() - t2
        apply_s += t2 - t1
    assert all(seq.grammar.is_accepting() for seq in seqs)
    masker.close()
    steps = len(doc_ids)
    t = masker.timings
    return {
        "streams": streams, "device": device, "steps": steps, "matcher_setup_ms": 1e3 * setup,
        "fill_ms_per_step": 1e3 * t.fill_s / steps, "wait_ms_per_step": 1e3 * t.wait_s / steps,
        "apply_ms_per_step": 1e3 * apply_s / steps, "advance_ms_per_step": 1e3 * advance_s / steps,
    }


def bench_engine(llm: Any, streams: int, max_tokens: int, overlaps: list[bool | None]) -> dict[str, Any]:
    """Step time of B streams under the schema (fill beside the forward pass or before it) vs B
    free streams, on the default model."""
    prompts = [llm.tokenizer.encode(f"Person number {i} as JSON:") for i in range(streams)]
    result: dict[str, Any] = {"streams": streams}
    runs: list[tuple[str, dict[str, Any], bool | None]] = [("free", {}, None)]
    spec = {"structured_kind": "json_schema", "structured_spec": json.dumps(SCHEMA)}
    runs += [(f"json_schema_overlap_{'auto' if o is None else o}", spec, o) for o in overlaps]
    for label, extra, overlap in runs:
        llm.engine.runner.grammar.overlap = overlap
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=not extra, **extra)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, **extra))  # warm-up
        engine = llm.engine
        steps0, time0 = engine.stats.steps, engine.stats.step_time_total
        masks0 = engine.runner.grammar.timings.wait_s, engine.runner.grammar.timings.fill_s
        outs = llm.generate(prompts, params)
        steps = engine.stats.steps - steps0
        result[f"{label}_step_ms"] = 1e3 * (engine.stats.step_time_total - time0) / steps
        result[f"{label}_tokens"] = sum(len(o.token_ids) for o in outs)
        if extra:
            result[f"{label}_mask_fill_ms_per_step"] = 1e3 * (engine.runner.grammar.timings.fill_s - masks0[1]) / steps
            result[f"{label}_mask_wait_ms_per_step"] = 1e3 * (engine.runner.grammar.timings.wait_s - masks0[0]) / steps
            result[f"{label}_valid_json"] = sum(_parses(o.text) for o in outs)
    return result


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def compare_libraries(hf: Any) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    ids = hf.encode(json.dumps(DOC), add_special_tokens=False)
    out: dict[str, Any] = {}
    opts = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB)
    llg: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=opts)
    llguidance.LLMatcher(tok, grammar)
    llg["compile_ms"] = 1e3 * (time.perf_counter() - t0)
    executor = llguidance.LLExecutor()
    for n in (1, 16):
        matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(n)]
        bitmask = lt.allocate_token_bitmask(n, VOCAB)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        fill = 0.0
        for token in ids:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask_par(executor, pairs, bitmask)
            fill += time.perf_counter() - t0
            for m in matchers:
                m.consume_token(token)
        llg[f"mask_ms_per_step_{n}"] = 1e3 * fill / len(ids)
    out["llguidance"] = llg
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed (PYTHONPATH a --target install to compare)"
        return out
    xg: dict[str, Any] = {}
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB))
    xg["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    xg["compile_ms"] = 1e3 * (time.perf_counter() - t0)
    for n in (1, 16):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(n)]
        bitmask = xgr.allocate_token_bitmask(n, VOCAB)
        batch = xgr.BatchGrammarMatcher() if n > 1 and hasattr(xgr, "BatchGrammarMatcher") else None
        fill = 0.0
        for token in ids:
            t0 = time.perf_counter()
            if batch is not None:
                batch.batch_fill_next_token_bitmask(matchers, bitmask)
            else:
                for i, m in enumerate(matchers):
                    m.fill_next_token_bitmask(bitmask, i)
            fill += time.perf_counter() - t0
            for m in matchers:
                m.accept_token(token)
        xg[f"mask_ms_per_step_{n}"] = 1e3 * fill / len(ids)
    out["xgrammar"] = xg
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/structured.json")
    parser.add_argument("--engine", action="store_true", help="also time the offline engine (loads the model)")
    parser.add_argument("--engine-tokens", type=int, default=32)
    parser.add_argument("--engine-streams", default="1,16", help="comma-separated stream counts")
    parser.add_argument("--model", default=None, help="model for --engine (default: the default model)")
    parser.add_argument("--engine-device", default="cpu", help="torch device of the engine for --engine")
    parser.add_argument("--compare", action="store_true", help="llguidance vs xgrammar (if importable)")
    parser.add_argument("--tokenizer", help="an HF tokenizer directory (default: the default model's)")
    parser.add_argument("--device", default="cpu", help="where the logits live for the mask apply")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer:
        from transformers import AutoTokenizer

        hf, name = AutoTokenizer.from_pretrained(args.tokenizer), os.path.basename(args.tokenizer.rstrip("/"))
    else:
        model_path = default_model_path()
        hf, name = load_tokenizer(model_path).hf, os.path.basename(model_path)
    gtok = GrammarTokenizer(hf, VOCAB, [0, 2])
    bench_masks(1, hf, gtok, args.device)  # warm-up: thread pool, executor, first torch calls
    report: dict[str, Any] = {"model": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "masks": [bench_masks(n, hf, gtok, args.device) for n in (1, 16)]}
    if args.compare:
        report["compare"] = compare_libraries(hf)
    if args.engine:
        from common.engine import LLM

        llm = LLM(args.model, kv_cache_memory="256MiB", max_num_seqs=16, device=args.engine_device)
        streams = [int(n) for n in args.engine_streams.split(",")]
        report["engine_device"] = args.engine_device
        report["engine"] = [bench_engine(llm, n, args.engine_tokens, [None, True, False]) for n in streams]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
