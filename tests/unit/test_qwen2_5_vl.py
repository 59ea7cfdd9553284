"""Qwen2.5-VL against transformers on the same tiny random weights and the same images.

The images go through transformers' own image processor; our model runs over a paged KV cache
(pages handed out in reverse order). fp32 logits must agree to 1e-3 after the prefill and after
each of 8 greedy decode steps (transformers recomputes the whole sequence each time).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from _vl_model import build_tiny_qwen2_5_vl, sample_image

from common.engine.multimodal import ImageItem, batch_inputs, build_multimodal_state, MultimodalChunk, encode_missing
from common.models.registry import load_model, load_vision_tower
from kernels.attention import build_attention_metadata

TOL = 1e-3


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> str:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def hf_model(vl_dir):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        vl_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def ours(vl_dir):
    return load_model(vl_dir, dtype=torch.float32)


def vl_prompt(vl_dir: str, sizes: list[tuple[int, int]], text: str = "describe"):
    """(prompt ids, pixel_values, grid_thw, items) with each image's placeholders expanded as the
    HF processor does."""
    tok = transformers.AutoTokenizer.from_pretrained(vl_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(vl_dir)
    images = [sample_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    out = processor(images=images, return_tensors="pt")
    ids = tok.encode("<|im_start|>user\n")
    items, first = [], 0
    for i, grid in enumerate(out["image_grid_thw"].tolist()):
        n = grid[0] * grid[1] * grid[2] // 4
        patches = grid[0] * grid[1] * grid[2]
        ids += tok.encode(f"image {i}:<|vision_start|>") + tok.encode("<|image_pad|>") * n + tok.encode("<|vision_end|>")
        items.append(ImageItem(content_hash=f"img{i}-{sizes[i]}", grid_thw=tuple(grid), num_tokens=n,
                               pixel_values=out["pixel_values"][first : first + patches]))
        first += patches
    ids += tok.encode(f"{text}<|im_end|>\n<|im_start|>assistant\n")
    return ids, out["pixel_values"], out["image_grid_thw"], items


@torch.no_grad()
def hf_logits(hf_model, ids, pixel_values, grid_thw) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    mm = (input_ids == hf_model.config.image_token_id).int()
    hf_model.model.rope_deltas = None
    out = hf_model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw,
                   mm_token_type_ids=mm, use_cache=False)
    return out.logits[0].float()


class PagedRun:
    """One sequence through our model over reversed, non-contiguous KV pages."""

    def __init__(self, model, config, state, page_size: int = 4, num_pages: int = 64) -> None:
        self.model, self.state, self.page_size = model, state, page_size
        self.kv = [torch.zeros(2, config.num_key_value_heads, num_pages, page_size, config.head_dim)
                   for _ in range(config.num_hidden_layers)]
        self.free = list(range(num_pages))
        self.table: list[int] = []
        self.length = 0

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        start, end = self.length, self.length + len(tokens)
        while len(self.table) * self.page_size < end:
            self.table.append(self.free.pop())
        chunk = MultimodalChunk(0, self.state, start, len(tokens))
        encode_missing(self.model, [chunk], torch.device("cpu"))
        pos, rows, embeds = batch_inputs([chunk], list(range(start, end)), torch.device("cpu"))
        meta = build_attention_metadata([len(tokens)], [end], [self.table], self.page_size)
        hidden = self.model(torch.tensor(tokens), pos, meta, self.kv, image_rows=rows, image_embeds=embeds)
        self.length = end
        return self.model.compute_logits(hidden)


@pytest.mark.parametrize("sizes", [[(56, 56)], [(56, 56), (112, 84)]], ids=["one-image", "two-sizes"])
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole-prefill", "chunked-prefill"])
def test_logits_match_transformers_prefill_and_decode(vl_dir, hf_model, ours, sizes, chunk):
    model, config = ours
    ids, pixels, grids, items = vl_prompt(vl_dir, sizes)
    state = build_multimodal_state(ids, items, config.image_token_id, config.merge_size, config.hidden_size)
    run = PagedRun(model, config, state)
    step = chunk or len(ids)
    logits = torch.cat([run.step(ids[i : i + step]) for i in range(0, len(ids), step)])
    ref = hf_logits(hf_model, ids, pixels, grids)
    assert (logits - ref).abs().max().item() < TOL
    tokens = list(ids)
    for _ in range(8):
        nxt = int(logits[-1].argmax())
        tokens.append(nxt)
        logits = run.step([nxt])
        ref = hf_logits(hf_model, tokens, pixels, grids)[-1:]
        assert (logits - ref).abs().max().item() < TOL


def test_mrope_positions_match_transformers(vl_dir, hf_model, ours):
    _, config = ours
    ids, _, grids, items = vl_prompt(vl_dir, [(112, 84), (56, 56)])
    state = build_multimodal_state(ids, items, config.image_token_id, config.merge_size, config.hidden_size)
    input_ids = torch.tensor([ids])
    ref, delta = hf_model.model.get_rope_index(input_ids, (input_ids == config.image_token_id).int(),
                                               image_grid_thw=grids)
    assert torch.equal(state.positions, ref[:, 0])
    assert state.rope_delta == int(delta)


def test_vision_tower_alone_matches_transformers(vl_dir, hf_model):
    tower, config = load_vision_tower(vl_dir)
    assert config.is_multimodal and config.merge_size == 2
    _, pixels, grids, _ = vl_prompt(vl_dir, [(56, 56), (112, 84)])
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixels, grids).pooler_output
    mine = tower.encode_images(pixels, grids.tolist())
    assert [m.shape for m in mine] == [r.shape for r in ref]
    for m, r in zip(mine, ref):
        assert (m - r).abs().max().item() < TOL


def test_prompt_and_images_must_agree(vl_dir, ours):
    _, config = ours
    ids, _, _, items = vl_prompt(vl_dir, [(56, 56)])
    args = (config.image_token_id, config.merge_size, config.hidden_size)
    with pytest.raises(ValueError, match="placeholder runs"):
        build_multimodal_state(ids, items * 2, *args)
    bad = ImageItem(items[0].content_hash, items[0].grid_thw, items[0].num_tokens + 1,
                    pixel_values=items[0].pixel_values)
    with pytest.raises(ValueError, match="num_tokens"):
        build_multimodal_state(ids, [bad], *args)
    empty = ImageItem(items[0].content_hash, items[0].grid_thw, items[0].num_tokens)
    with pytest.raises(ValueError, match="neither pixel_values nor embeddings"):
        build_multimodal_state(ids, [empty], *args)
    wrong = ImageItem(items[0].content_hash, items[0].grid_thw, items[0].num_tokens,
                      embeddings=torch.zeros(items[0].num_tokens, config.hidden_size + 1))
    with pytest.raises(ValueError, match="embeddings shape"):
        build_multimodal_state(ids, [wrong], *args)
