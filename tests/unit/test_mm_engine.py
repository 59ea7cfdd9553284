"""Images in the engine on the tiny Qwen2.5-VL: greedy output equals transformers' generate, with
the engine's own vision tower (EP-D) or given embeddings (ED-P), whole or chunked prefill (chunk
boundaries inside an image), batched with text; the prefix cache reuses an image's KV only for the
same image; text-only models and P/D holds refuse images clearly."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _model_helpers import make_hf_model, save_hf_model
from _vl_model import build_tokenizer, sample_image

from common.engine import LLM, SamplingParams
from common.engine.multimodal import ImageItem
from common.image_inputs import ImageProcessor, expand_image_placeholders

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def vl_llm(tiny_vl_model_dir):
    return LLM(tiny_vl_model_dir, dtype="float32", kv_cache_memory="4MiB", page_size=4, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def hf_vl(tiny_vl_model_dir):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_vl_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def chat_prompt(llm: LLM, images, text: str) -> tuple[list[int], list[ImageItem]]:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)
    items = ImageProcessor.from_model_dir(llm.engine.model_path).items(images)
    return expand_image_placeholders(ids, items, llm.engine.model_config.image_token_id), items


@torch.no_grad()
def hf_generate(hf_vl, ids: list[int], items: list[ImageItem], max_new_tokens: int = 8) -> list[int]:
    input_ids = torch.tensor([ids])
    hf_vl.model.rope_deltas = None
    out = hf_vl.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.cat([i.pixel_values for i in items]),
        image_grid_thw=torch.tensor([i.grid_thw for i in items]),
        mm_token_type_ids=(input_ids == hf_vl.config.image_token_id).int(),
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
    )
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(vl_llm, hf_vl):
    images = [sample_image(56, 56, seed=1), sample_image(112, 84, seed=2)]
    ids, items = chat_prompt(vl_llm, images, "what differs?")
    expected = hf_generate(hf_vl, ids, items)
    out = vl_llm.generate(ids, GREEDY, images=[items])[0]
    assert out.token_ids == expected
    # the offline API from PIL images and a chat with image parts gives the same
    conv = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                         {"type": "text", "text": "what differs?"}]}]
    assert vl_llm.chat(conv, GREEDY)[0].token_ids == expected
    assert vl_llm.engine.block_manager.num_used_pages == 0
    vl_llm.engine.check_integrity()


def test_chunked_prefill_batched_with_text_and_given_embeddings(tiny_vl_model_dir, vl_llm, hf_vl):
    images = [sample_image(112, 84, seed=3), sample_image(56, 56, seed=4)]
    ids, items = chat_prompt(vl_llm, images, "and now?")
    expected = hf_generate(hf_vl, ids, items)
    text_ids = vl_llm.tokenizer.encode("plain text, no image at all")
    text_expected = vl_llm.generate(text_ids, GREEDY)[0].token_ids
    # 5-token steps: chunk boundaries fall inside both images' placeholder runs
    small = LLM(tiny_vl_model_dir, dtype="float32", kv_cache_memory="4MiB", page_size=4, max_num_batched_tokens=5)
    embedded = [copy.copy(item) for item in items]
    for item, emb in zip(embedded, small.engine.model.encode_images(
            torch.cat([i.pixel_values for i in items]), [i.grid_thw for i in items])):
        item.pixel_values, item.embeddings = None, emb  # ED-P / E-P-D: embeddings from elsewhere
    outs = small.generate([ids, text_ids, ids], GREEDY, images=[items, None, embedded])
    assert [o.token_ids for o in outs] == [expected, text_expected, expected]
    assert small.engine.block_manager.num_used_pages == 0


def test_prefix_cache_covers_the_image_content(vl_llm):
    engine = vl_llm.engine
    image, other = sample_image(112, 84, seed=5), sample_image(112, 84, seed=6)
    ids, items = chat_prompt(vl_llm, [image], "cache me")
    first = vl_llm.generate(ids, GREEDY, images=[items])[0]
    _, again = chat_prompt(vl_llm, [image], "cache me")
    second = vl_llm.generate(ids, GREEDY, images=[again])[0]
    assert second.token_ids == first.token_ids
    # everything but the last (partial or sampled) page comes from the cache
    assert second.num_cached_tokens >= len(ids) - engine.page_size
    other_ids, other_items = chat_prompt(vl_llm, [other], "cache me")
    assert other_ids == ids  # same placeholders, different pixels
    third = vl_llm.generate(other_ids, GREEDY, images=[other_items])[0]
    offset = other_items[0].offset
    assert third.num_cached_tokens <= offset  # only the text before the image is shared
    assert third.num_cached_tokens == offset // engine.page_size * engine.page_size


def test_images_refused_clearly(tmp_path, vl_llm):
    text_dir = save_hf_model(make_hf_model("qwen2"), tmp_path / "qwen2")
    build_tokenizer().save_pretrained(text_dir)
    text_llm = LLM(text_dir, dtype="float32", kv_cache_memory="2MiB")
    item = ImageItem("h", (1, 4, 4), 4, pixel_values=torch.zeros(16, 1176))
    with pytest.raises(ValueError, match="text-only"):
        text_llm.engine.add_request("r1", [1, 2, 3], GREEDY, images=[item])
    with pytest.raises(ValueError, match="text-only"):
        text_llm.generate([1, 2, 3], GREEDY, images=[[sample_image(56, 56)]])
    assert text_llm.engine.num_requests == 0
    ids, items = chat_prompt(vl_llm, [sample_image(56, 56)], "hold")
    with pytest.raises(ValueError, match="hand-off"):
        vl_llm.engine.add_request("r2", ids, GREEDY, hold_after_prefill=True, images=items)
    with pytest.raises(ValueError, match="placeholder runs"):
        vl_llm.engine.add_request("r3", ids, GREEDY, images=items * 2)
    assert vl_llm.engine.num_requests == 0
