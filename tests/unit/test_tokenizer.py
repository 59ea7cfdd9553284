"""Tokenizer loading and chat templates, checked against transformers on the same files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.tokenizer import Tokenizer, default_model_path, load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "And good night? 🌙 ñ 中文"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second\n\nwith  spaces "},
        {"role": "user", "content": ""},
    ],
]

# Exercises what the sandbox must match transformers on: trim_blocks/lstrip_blocks, bos_token from
# the special-token map, tojson without HTML escaping, raise_exception, loop controls.
HF_DIR_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}\n"
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}\n"
    "  {% if message['role'] == 'system' and not loop.first %}{% continue %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def gguf_tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def reference_gguf():
    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    gguf_tokenizer.hf.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HF_DIR_TEMPLATE
    config["bos_token"] = "<|endoftext|>"
    config_path.write_text(json.dumps(config))
    _make_plain_text_start_with_bos(directory / "tokenizer.json", "<|endoftext|>", 0)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return directory


def _make_plain_text_start_with_bos(tokenizer_json: Path, bos: str, bos_id: int) -> None:
    """Like Llama tokenizers: encode() prepends BOS, so a chat prompt must not get a second one."""
    data = json.loads(tokenizer_json.read_text())
    bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    tokenizer_json.write_text(json.dumps(data))


def _reference_ids(reference, messages, **kwargs) -> list[int]:
    out = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    # transformers 5 returns a BatchEncoding; 4.x returned the list itself
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


# ---- GGUF --------------------------------------------------------------------------------


def test_gguf_basic_properties(gguf_tokenizer: Tokenizer) -> None:
    assert gguf_tokenizer.vocab_size == 49152
    im_end = gguf_tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2]
    assert 2 in gguf_tokenizer.eos_token_ids
    assert gguf_tokenizer.bos_token_id == 1
    assert {0, 1, 2} <= set(gguf_tokenizer.all_special_ids)
    assert gguf_tokenizer.convert_ids_to_tokens([2]) == ["<|im_end|>"]


def test_encode_decode_roundtrip(gguf_tokenizer: Tokenizer) -> None:
    text = "Hello world, héllo 😀 世界\n\tend"
    ids = gguf_tokenizer.encode(text)
    assert all(0 <= i < gguf_tokenizer.vocab_size for i in ids)
    assert gguf_tokenizer.decode(ids) == text
    assert gguf_tokenizer.decode([1] + ids + [2], skip_special_tokens=True) == text
    assert gguf_tokenizer.decode([1] + ids, skip_special_tokens=False) == "<|im_start|>" + text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(
    gguf_tokenizer: Tokenizer, reference_gguf, messages: list[dict], add_generation_prompt: bool
) -> None:
    ours = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference_gguf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gguf_encode_chat_matches_transformers_ids(gguf_tokenizer: Tokenizer, reference_gguf, messages) -> None:
    ids = gguf_tokenizer.encode_chat(messages)
    assert ids == _reference_ids(reference_gguf, messages)
    # exactly one leading <|im_start|> (the template's), none added on top
    assert ids[0] == 1 and ids[1] != 1


def test_content_parts_are_joined_for_text_templates(gguf_tokenizer: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "two"}]}]
    plain = [{"role": "user", "content": "line one\ntwo"}]
    assert gguf_tokenizer.apply_chat_template(parts) == gguf_tokenizer.apply_chat_template(plain)


def test_non_text_part_is_rejected_for_text_model(gguf_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        gguf_tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("bad", [[], "hello", [{"content": "no role"}], [{"role": "user", "content": 5}]])
def test_malformed_messages_raise_value_error(gguf_tokenizer: Tokenizer, bad) -> None:
    with pytest.raises(ValueError):
        gguf_tokenizer.apply_chat_template(bad)


def test_none_valued_keys_are_dropped_like_transformers(gguf_tokenizer: Tokenizer, reference_gguf) -> None:
    messages = [{"role": "user", "content": "hi", "name": None}]
    assert gguf_tokenizer.apply_chat_template(messages) == reference_gguf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


# ---- HF directory ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dir_tokenizer(hf_dir: Path) -> Tokenizer:
    return load_tokenizer(str(hf_dir))


@pytest.fixture(scope="module")
def reference_dir(hf_dir: Path):
    return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)


def test_hf_dir_properties(dir_tokenizer: Tokenizer) -> None:
    assert dir_tokenizer.vocab_size == 49152
    assert dir_tokenizer.bos_token_id == 0
    # tokenizer eos + generation_config eos list + the template's end-of-turn token
    assert {2, 5} <= dir_tokenizer.eos_token_ids


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_dir_chat_template_matches_transformers(dir_tokenizer: Tokenizer, reference_dir, messages) -> None:
    ours = dir_tokenizer.apply_chat_template(messages)
    assert ours == reference_dir.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|endoftext|><|im_start|>")
    ids = dir_tokenizer.encode_chat(messages)
    assert ids == _reference_ids(reference_dir, messages)
    # the tokenizer adds BOS to plain text, but the chat prompt carries the template's BOS only once
    assert dir_tokenizer.encode("x")[0] == 0
    assert ids[0] == 0 and ids[1] != 0


def test_hf_dir_tools_render_as_unescaped_json(dir_tokenizer: Tokenizer, reference_dir) -> None:
    tools = [{"type": "function", "function": {"name": "café_lookup", "description": "<b>&</b>"}}]
    messages = [{"role": "user", "content": "use a tool"}]
    ours = dir_tokenizer.apply_chat_template(messages, tools=tools)
    assert ours == reference_dir.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"café_lookup"' in ours and "<b>&</b>" in ours


def test_template_raise_exception_becomes_value_error(dir_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="tool messages are not supported"):
        dir_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def _write_dir(tmp_path: Path, source: Tokenizer, config_update: dict, files: dict[str, str] | None = None) -> Path:
    source.hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.update(config_update)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_chat_template_jinja_file(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ strftime_now('%Y') }}"
    tokenizer = load_tokenizer(str(_write_dir(tmp_path, gguf_tokenizer, {}, {"chat_template.jinja": template})))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    reference = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert rendered == reference.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("[user] hi\n")


def test_named_templates_pick_tool_use_when_tools_given(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    templates = [
        {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "TOOLS {{ tools | length }} {{ messages[0]['content'] }}"},
    ]
    tokenizer = load_tokenizer(str(_write_dir(tmp_path, gguf_tokenizer, {"chat_template": templates})))
    messages = [{"role": "user", "content": "q"}]
    assert tokenizer.apply_chat_template(messages) == "DEFAULT q"
    assert tokenizer.apply_chat_template(messages, tools=[{"type": "function"}]) == "TOOLS 1 q"


def test_model_without_template_gives_clear_error(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    tokenizer = load_tokenizer(str(_write_dir(tmp_path, gguf_tokenizer, {})))
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    # still a working tokenizer for plain prompts
    assert tokenizer.decode(tokenizer.encode("plain prompt")) == "plain prompt"


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0")
    with pytest.raises(ValueError, match="gguf"):
        load_tokenizer(str(not_gguf))
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


def test_template_cannot_escape_the_sandbox(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    template = "{{ messages[0]['content'].__class__.__mro__ }}"
    tokenizer = load_tokenizer(str(_write_dir(tmp_path, gguf_tokenizer, {"chat_template": template})))
    with pytest.raises(ValueError, match="unsafe"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gguf_conversion_is_cached_on_disk_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch) -> None:
    from common import tokenizer as tokenizer_module

    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path))
    path = os.path.realpath(str(default_model_path()))
    text = "Héllo wörld! 你好 <|im_end|> 123"
    first = tokenizer_module._load_gguf(path)  # converts and fills the cache
    entry = Path(tokenizer_module._tokenizer_cache_dir(path))
    assert (entry / "tokenizer.json").is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]  # no leftovers
    cached = tokenizer_module._load_gguf(path)
    for tok in (first, cached):
        assert tok.encode(text) == first.encode(text)
        assert tok.eos_token_ids == first.eos_token_ids and tok.chat_template == first.chat_template
    (entry / "tokenizer.json").write_text("{not json")
    rebuilt = tokenizer_module._load_gguf(path)  # the damaged entry is ignored and replaced
    assert rebuilt.encode(text) == first.encode(text)
    assert json.loads((entry / "tokenizer.json").read_text())
