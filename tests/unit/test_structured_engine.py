"""Structured outputs through the offline engine on the default model: chunked prefill,
preemption by recompute and the P/D hand-off keep the grammar state (outputs stay valid and
equal to an undisturbed run)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from common.engine import LLM, EngineConfig, LLMEngine, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "year": {"type": "integer", "minimum": 0, "maximum": 3000},
    },
    "required": ["city", "year"],
    "additionalProperties": False,
}
STRUCTURED = SamplingParams(temperature=0.0, max_tokens=40, structured_kind="json_schema",
                            structured_spec=json.dumps(SCHEMA))
TEXTS = [
    "The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of",
]


def prompts(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(t) for t in TEXTS]


def check(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.fixture(scope="module")
def alone(smol_llm):
    return [smol_llm.generate(p, STRUCTURED)[0] for p in prompts(smol_llm)]


def test_structured_outputs_parse_and_stop(smol_llm, alone):
    for out in alone:
        assert out.finish_reason == "stop", out.text
        check(out.text)
    seeded = smol_llm.generate(prompts(smol_llm)[:2], SamplingParams(
        temperature=1.0, seed=11, max_tokens=24, structured_kind="json_schema",
        structured_spec=json.dumps(SCHEMA)))
    for request in seeded:
        for choice in request.outputs:
            if choice.finish_reason == "stop":
                check(choice.text)
            else:  # cut by max_tokens: incomplete JSON, as OpenAI does
                assert choice.finish_reason == "length"


def test_choice_stops_when_the_grammar_is_complete(smol_llm):
    out = smol_llm.generate(prompts(smol_llm)[0], SamplingParams(
        temperature=0.0, max_tokens=20, structured_kind="choice", structured_spec='["alpha", "beta"]'))[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"


def test_max_tokens_cut_off_is_length(smol_llm):
    out = smol_llm.generate(prompts(smol_llm)[1], SamplingParams(
        temperature=0.0, max_tokens=3, structured_kind="json_schema", structured_spec=json.dumps(SCHEMA)))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text.startswith("{")


def test_bad_spec_is_refused_at_add(smol_llm):
    with pytest.raises(ValueError, match="structured_spec"):
        smol_llm.generate([1, 2, 3], SamplingParams(structured_kind="regex", structured_spec="(unclosed"))


def test_chunked_prefill_and_preemption_keep_the_grammar(smollm_path, smol_llm, alone):
    # 8-token steps force chunked prefill; 16 pages of 4 tokens cannot hold all three sequences.
    small = LLM(smollm_path, dtype="float32", kv_cache_memory=16 * 4 * 30 * 2 * 3 * 64 * 4, page_size=4,
                max_num_batched_tokens=8)
    assert small.engine.num_pages == 16
    outs = small.generate(prompts(smol_llm), STRUCTURED)
    assert small.engine.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    for out in outs:
        check(out.text)
    assert small.engine.block_manager.num_used_pages == 0


def test_handoff_replays_the_grammar_on_the_decode_side(smollm_path, smol_llm, alone):
    prefill = smol_llm.engine
    decode = LLMEngine(EngineConfig(model=smollm_path, dtype="float32", kv_cache_memory="16MiB"))
    ids = prompts(smol_llm)[1]
    prefill.add_request("pd", ids, STRUCTURED, hold_after_prefill=True)
    while not prefill.handoff.is_held("pd"):
        prefill.step()
    exp = prefill.handoff.export_kv("pd")
    decode.handoff.reserve_transfer("pd", exp.prompt_ids, exp.output_ids, STRUCTURED, num_tokens=exp.num_tokens)
    decode.handoff.write_kv_layers("pd", 0, exp.layers(0, exp.num_layers))
    decode.handoff.commit_transfer("pd")
    prefill.handoff.release_held("pd")
    tokens = list(exp.output_ids)
    finish = None
    for _ in range(100):
        if not decode.has_unfinished():
            break
        for out in decode.step():
            tokens.extend(out.new_token_ids)
            finish = out.finish_reason or finish
    assert finish == "stop"
    assert tokens == alone[1].token_ids
    check(smol_llm.tokenizer.decode(tokens))
