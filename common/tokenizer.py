"""Tokenizer loading (GGUF file or HF directory): encoding, decoding, special and EOS ids.

The HF fast tokenizer does the encoding and decoding; chat templates are rendered by
``common.chat_template`` so the gateway produces exactly what
`tokenizer.apply_chat_template(..., tokenize=False)` would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from functools import lru_cache
from typing import Any


from common.chat_template import render_chat
from common.default_model import default_model_path  # noqa: F401  (re-exported for callers)

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

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI format) to the prompt text the model was trained on."""
        return render_chat(
            self._select_template(tools), messages, add_generation_prompt=add_generation_prompt, tools=tools,
            context={**self.special_tokens_map, **template_kwargs},
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of the rendered conversation, equal to transformers' `apply_chat_template(tokenize=True)`.

        The template writes every special token the model expects (BOS included), so nothing is
        added on top: adding special tokens again would double the BOS.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)


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


def _tokenizer_cache_dir(path: str) -> str:
    """Where the converted tokenizer of GGUF ``path`` is kept (one entry per file version)."""
    root = os.environ.get("XLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "xllm")
    st = os.stat(path)
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(root, "tokenizers", key)


def _load_gguf_hf_tokenizer(path: str):
    """The HF fast tokenizer of a GGUF file.

    transformers converts it from the GGUF vocab and merges, which takes ~7 s for a 49k vocab;
    the result is saved once under the cache directory (``XLLM_CACHE_DIR``, default
    ``~/.cache/xllm``) and later loads read it back in a fraction of a second. A cache that
    cannot be read or written only costs the conversion.
    """
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache, local_files_only=True)
        except Exception as exc:  # a damaged entry: convert again and replace it
            logger.warning("ignoring the cached tokenizer %s (%s)", cache, exc)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cache))
        hf.save_pretrained(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)  # atomic: a concurrent loader sees all of it or none
    except OSError as exc:  # read-only home, or another process filled the entry first
        logger.info("not caching the converted tokenizer (%s)", exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return hf


def _load_gguf(path: str) -> Tokenizer:
    metadata = _read_gguf_metadata(path)
    hf = _load_gguf_hf_tokenizer(path)
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
