"""A tiny random-weight Qwen2.5-VL checkpoint directory, saved with transformers.

``build_tiny_qwen2_5_vl(path)`` writes everything ``xllm serve --model DIR`` needs: ``config.json``,
safetensors weights, ``tokenizer.json`` (+ ``tokenizer_config.json`` with the chat template),
``preprocessor_config.json`` (transformers' own Qwen2-VL image processor) and
``chat_template.jinja``. The tokenizer is a byte-level vocabulary (256 bytes, no merges) plus
Qwen's special tokens, so any text encodes and the vision tokens exist.
Used by the model tests and, through the ``tiny_vl_model_dir`` fixture, by the integration tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from PIL import Image

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 272  # 263 tokenizer entries, padded as real checkpoints pad theirs (ids past 262 decode to "")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Window attention has effect: windows of 2x2 merged tokens (window_size 56 px / merge 2 / patch 14);
# block 0 attends inside windows, block 1 over the whole image.
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
              tokens_per_second=2)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is sharp (see _model_helpers.randomize_)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name or "ln_q" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
            p.copy_(noise * (1.2 / math.sqrt(fan_in)))


def make_hf_vl_model(seed: int = 0) -> transformers.Qwen2_5_VLForConditionalGeneration:
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = transformers.Qwen2_5_VLConfig(
        text_config={**TEXT, "bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    _randomize(model, seed)
    return model


def make_image_processor() -> transformers.Qwen2VLImageProcessorPil:
    # Small pixel bounds keep images tiny: a 56x56 image is 4x4 patches -> 4 placeholder tokens.
    return transformers.Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2, temporal_patch_size=2,
    )


def build_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> str:
    """Write the tiny model directory to ``path`` (created) and return it as a string."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_hf_vl_model(seed)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(path))
    make_image_processor().save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(path)


def sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (gradients plus noise), so patches differ."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    base = torch.stack([ys * 255 * torch.ones_like(xs), xs * 255 * torch.ones_like(ys), (xs + ys) * 127], dim=-1)
    pixels = (base + 40 * torch.rand(height, width, 3, generator=gen)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")
