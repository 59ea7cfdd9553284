"""Structured outputs on the real SmolLM2 tokenizer: compiling specs, masks, replay, the sampler's mask."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from common.engine.grammar import GrammarError, GrammarTokenizer, grammar_for
from common.engine.sampler import Sampler
from common.engine.sampling_params import InvalidSamplingParameter, SamplingParams
from common.engine.sequence import Sequence
from common.engine.token_mask import TokenMask, apply_token_mask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(smollm_path).hf


@pytest.fixture(scope="module")
def gtok(hf_tokenizer) -> GrammarTokenizer:
    return GrammarTokenizer(hf_tokenizer, 49152, [0, 2])


def allowed_ids(state, vocab: int) -> torch.Tensor:
    import llguidance.torch as llg_torch

    bitmask = llg_torch.allocate_token_bitmask(1, vocab)
    llg_torch.fill_next_token_bitmask(state.matcher, bitmask, 0)
    logits = torch.zeros(1, vocab)
    apply_token_mask(logits, TokenMask([0], bitmask))
    return torch.isfinite(logits[0]).nonzero().flatten()


def random_walk(gtok: GrammarTokenizer, kind: str, spec: str | None, seed: int, limit: int = 200) -> list[int]:
    """Sample uniformly among the allowed tokens until only EOS is left; every pick must be allowed."""
    rng = random.Random(seed)
    state = gtok.new_state(kind, spec)
    out: list[int] = []
    for _ in range(limit):
        allowed = allowed_ids(state, gtok.vocab_size).tolist()
        assert allowed, "the grammar allowed nothing"
        if state.is_stopped():
            assert set(allowed) <= {0, 2}  # only EOS once the grammar is complete
            break
        # Prefer closing tokens now and then so the walk ends in bounded steps.
        non_eos = [t for t in allowed if t not in (0, 2)]
        token = rng.choice(non_eos) if non_eos and (len(out) < 5 or rng.random() < 0.8) else rng.choice(allowed)
        if token in (0, 2):
            assert state.is_accepting()
            break
        state.consume(token)
        assert not state.is_error(), state.matcher.get_error()
        out.append(token)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_every_sampled_token_stays_in_the_schema(gtok, hf_tokenizer, seed):
    # A uniform walk over allowed tokens reaches long strings; bounded keys keep it finite.
    tokens = random_walk(gtok, "json_schema", json.dumps(SCHEMA), seed, limit=400)
    text = hf_tokenizer.decode(tokens)
    state = gtok.new_state("json_schema", json.dumps(SCHEMA))
    state.consume_many(tokens)
    if state.is_accepting():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice_walks_match(gtok, hf_tokenizer):
    for seed in range(3):
        text = hf_tokenizer.decode(random_walk(gtok, "regex", r"[0-9]{3}-[a-z]{2,4}", seed))
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        choices = ["yes", "no", "maybe so", 'say "hi"\n']
        text = hf_tokenizer.decode(random_walk(gtok, "choice", json.dumps(choices), seed))
        assert text in choices


def test_a_token_outside_the_grammar_is_masked(gtok, hf_tokenizer):
    state = gtok.new_state("json_object", None)
    allowed = set(allowed_ids(state, gtok.vocab_size).tolist())
    assert hf_tokenizer.encode("{", add_special_tokens=False)[0] in allowed
    assert hf_tokenizer.encode("Hello", add_special_tokens=False)[0] not in allowed
    assert 0 not in allowed and 2 not in allowed  # EOS only once the object is complete


def test_replay_after_handoff_gives_the_same_state(gtok, hf_tokenizer):
    text = '{"name": "Bo", "age": 7, "tags": ["a"'
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    live = gtok.new_state("json_schema", json.dumps(SCHEMA))
    for token in ids:
        live.consume(token)
    # The receiving side: a fresh matcher synced to the outputs it is given.
    replayed = gtok.new_state("json_schema", json.dumps(SCHEMA))
    replayed.sync(ids)
    assert replayed.num_consumed == live.num_consumed == len(ids)
    assert torch.equal(allowed_ids(replayed, gtok.vocab_size), allowed_ids(live, gtok.vocab_size))
    replayed.sync(ids)  # already in sync: nothing consumed twice
    assert replayed.num_consumed == len(ids)
    rest = hf_tokenizer.encode('], "address": {"zip": "12345"}}', add_special_tokens=False)
    replayed.consume_many(rest)
    assert replayed.is_accepting()


def test_sequence_matcher_survives_preemption_by_recompute(gtok, hf_tokenizer):
    params = SamplingParams(structured_kind="json_object")
    seq = Sequence(request_id="r", prompt_ids=[1, 2, 3], params=params, max_tokens=50)
    seq.grammar = gtok.new_state("json_object", None)
    ids = hf_tokenizer.encode('{"a": 1', add_special_tokens=False)
    seq.token_ids.extend(ids)
    seq.grammar.sync(seq.output_ids)
    seq.num_computed = 0  # what a recompute preemption does: KV gone, tokens and matcher kept
    seq.grammar.sync(seq.output_ids)
    assert seq.grammar.num_consumed == len(ids) and not seq.grammar.is_error()


@pytest.mark.parametrize("kind, spec, fragment", [
    ("json_schema", json.dumps({"type": "foo"}), "Invalid type"),
    ("json_schema", json.dumps({"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
    ("json_schema", json.dumps({"properties": {"a": {"$ref": "#/$defs/none"}}}), "does not exist"),
    ("json_schema", json.dumps({"type": "array", "uniqueItems": True}), "Unimplemented"),
    ("regex", "[a-z", "unclosed"),
    ("grammar", "start: foo", "unknown name"),
    ("grammar", "root ::= \"yes\" | other", "not found"),
])
def test_impossible_specs_are_refused(kind, spec, fragment):
    with pytest.raises(GrammarError, match=re.escape(fragment)):
        grammar_for(kind, spec)
    with pytest.raises(InvalidSamplingParameter) as info:
        SamplingParams(structured_kind=kind, structured_spec=spec).validate()
    assert info.value.param == "structured_spec"


def test_gbnf_and_lark_grammars_compile():
    assert grammar_for("grammar", 'root ::= "yes" | "no"')
    assert grammar_for("grammar", 'start: "yes" | "no"')
    assert grammar_for("grammar", 'root ::= "yes" | "no"') is grammar_for("grammar", 'root ::= "yes" | "no"')  # cached


@pytest.mark.parametrize("fields, param", [
    ({"structured_kind": "yaml", "structured_spec": "x"}, "structured_kind"),
    ({"structured_spec": "x"}, "structured_spec"),
    ({"structured_kind": "json_object", "structured_spec": "{}"}, "structured_spec"),
    ({"structured_kind": "regex"}, "structured_spec"),
    ({"structured_kind": "json_schema", "structured_spec": "{"}, "structured_spec"),
    ({"structured_kind": "json_schema", "structured_spec": "[1]"}, "structured_spec"),
    ({"structured_kind": "choice", "structured_spec": '["a", 1]'}, "structured_spec"),
    ({"structured_kind": "choice", "structured_spec": "[]"}, "structured_spec"),
])
def test_sampling_params_shape_checks(fields, param):
    with pytest.raises(InvalidSamplingParameter) as info:
        SamplingParams(**fields).validate()
    assert info.value.param == param


def test_structured_fields_travel_in_the_wire_form():
    params = SamplingParams(structured_kind="regex", structured_spec="[0-9]+")
    again = SamplingParams.from_dict(params.to_dict())
    assert (again.structured_kind, again.structured_spec) == ("regex", "[0-9]+")


def test_apply_token_mask_matches_a_per_row_loop():
    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the tail word is partial
    logits = torch.randn(4, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), dtype=torch.int32, generator=gen)
    expected = logits.clone()
    for i, row in enumerate([1, 3]):
        for t in range(vocab):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    apply_token_mask(logits, TokenMask([1, 3], bitmask))
    assert torch.equal(logits, expected)


def _mask_allowing(vocab: int, rows: list[int], allowed: list[list[int]]) -> TokenMask:
    bitmask = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for i, tokens in enumerate(allowed):
        for t in tokens:
            word = int(bitmask[i, t // 32]) | (1 << (t % 32))
            bitmask[i, t // 32] = word - 2**32 if word >= 2**31 else word
    return TokenMask(rows, bitmask)


def test_sampler_applies_the_mask_to_greedy_and_seeded_rows():
    from common.engine.sampler import make_generator

    vocab = 64
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, 5] = 100.0  # the unmasked favourite
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0)]
    mask = _mask_allowing(vocab, [0, 1], [[7, 40], [9, 33, 63]])
    out = Sampler({0})(logits, params, [[1]] * 3, [[]] * 3, [None, make_generator(3), None], token_mask=mask)
    assert out.token_ids[0] in (7, 40) and out.token_ids[1] in (9, 33, 63)
    assert out.token_ids[2] == 5  # a row without a mask is untouched


def test_grammar_wins_over_min_tokens():
    # The grammar is complete (only EOS allowed) but min_tokens bans EOS: the grammar wins.
    vocab = 40
    logits = torch.zeros(1, vocab)
    params = [SamplingParams(temperature=0.0, min_tokens=10)]
    out = Sampler({0})(logits, params, [[1]], [[]], [None], token_mask=_mask_allowing(vocab, [0], [[0]]))
    assert out.token_ids == [0]


def test_migrated_continuation_replays_the_outputs_inside_its_prompt(gtok, hf_tokenizer):
    from common.engine.grammar_mask import GrammarMasker

    streamed = hf_tokenizer.encode('{"name": "Bo", "age": 7', add_special_tokens=False)
    live = gtok.new_state("json_schema", json.dumps(SCHEMA))
    live.consume_many(streamed)
    # The gateway re-submits prompt + streamed tokens, saying how many of them are outputs.
    params = SamplingParams(structured_kind="json_schema", structured_spec=json.dumps(SCHEMA),
                            structured_prefix_tokens=len(streamed))
    params.validate_for_model(3 + len(streamed), 2048, 49152)
    seq = Sequence(request_id="m", prompt_ids=[1, 2, 3] + streamed, params=params, max_tokens=20)
    GrammarMasker("", gtok.vocab_size, [0, 2], tokenizer=gtok).ensure_state(seq)
    assert seq.grammar.num_consumed == 0
    assert torch.equal(allowed_ids(seq.grammar, gtok.vocab_size), allowed_ids(live, gtok.vocab_size))
    with pytest.raises(InvalidSamplingParameter) as info:
        SamplingParams(structured_kind="json_object", structured_prefix_tokens=9).validate_for_model(4, 2048, 100)
    assert info.value.param == "structured_prefix_tokens"


def test_gateway_migration_marks_the_streamed_outputs():
    from types import SimpleNamespace

    from services.gateway.migration import continuation_sampling

    base = SamplingParams(structured_kind="regex", structured_spec="[a-z]+", max_tokens=10).to_dict()
    sampling = continuation_sampling(base, SimpleNamespace(token_ids=[5, 6, 7], seed_index=0))
    assert sampling.structured_prefix_tokens == 3 and sampling.max_tokens == 7
    plain = continuation_sampling(SamplingParams(max_tokens=10).to_dict(), SimpleNamespace(token_ids=[5], seed_index=0))
    assert plain.structured_prefix_tokens == 0
