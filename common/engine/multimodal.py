"""Images in a request: what the engine is given, and what it derives from them.

A multimodal prompt already holds each image's expanded placeholders (``<|vision_start|>``,
``num_tokens`` x ``<|image_pad|>``, ``<|vision_end|>``, as the HF processor writes them). The
engine turns that into three things:

* **embeddings** spliced into the input embeddings at the placeholder rows (from the item, or
  from the model's own vision tower when the item only has pixels: EP-D);
* **M-RoPE positions** ``[3, T]`` (temporal, height, width) for the prompt, and the *rope delta*
  that shifts every later (decode) position, as transformers' ``get_rope_index`` computes them;
* **hash ids** for the prefix cache: the prompt with each placeholder replaced by a virtual id
  derived from (image content hash, index in the image), so equal pages mean equal pixels too.
  Virtual ids are past the int32 range of real tokens (see ``block_manager.hash_page``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

__all__ = ["ImageItem", "MultimodalState", "MultimodalChunk", "build_multimodal_state", "mrope_positions",
           "virtual_token_base", "encode_missing", "batch_inputs"]

# Virtual ids start here: no real token id reaches it, so they cannot alias a text page.
_VIRTUAL_ID_FLOOR = 1 << 32
_VIRTUAL_ID_SPAN = 1 << 56


@dataclass
class ImageItem:
    content_hash: str  # sha256 hex of the decoded RGB pixels + size (set by image_inputs)
    grid_thw: tuple[int, int, int]  # from the HF image processor (image_grid_thw row)
    num_tokens: int  # placeholder tokens in the prompt = t*h*w // merge_size**2
    offset: int = -1  # index in prompt_ids of its first placeholder token (-1: engine finds it)
    pixel_values: torch.Tensor | None = None  # [num_patches, C*T*P*P] as the HF processor returns
    embeddings: torch.Tensor | None = None  # [num_tokens, hidden] from a vision tower (ED-P / E-P-D)


@dataclass
class MultimodalState:
    """What a sequence carries for its images (travels with it on a P/D hand-off)."""

    images: list[ImageItem]
    positions: torch.Tensor  # [3, num_prompt_tokens] int64 M-RoPE positions of the prompt
    rope_delta: int  # position of token i >= num_prompt_tokens is i + rope_delta on all three axes
    hash_prompt_ids: list[int]  # prompt ids with placeholders replaced by virtual ids
    # Per image: its embeddings once known (given, or encoded by the engine); dropped when the
    # whole prompt has its KV (a preempted sequence re-encodes, which is rare and cheap to redo).
    embeddings: list[torch.Tensor | None] = field(default_factory=list)

    def needs_encoding(self) -> list[int]:
        return [i for i, e in enumerate(self.embeddings) if e is None]


def virtual_token_base(content_hash: str) -> int:
    """First virtual id of an image's placeholders (the k-th placeholder is base + k)."""
    digest = hashlib.blake2b(content_hash.encode(), digest_size=8, person=b"xllm-img").digest()
    return _VIRTUAL_ID_FLOOR + int.from_bytes(digest, "little") % _VIRTUAL_ID_SPAN


def _locate(prompt_ids: list[int], images: list[ImageItem], image_token_id: int) -> list[int]:
    """Offsets of each image's placeholder run: given ones are checked, -1 ones found in order."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(prompt_ids)
    while i < n:
        if prompt_ids[i] == image_token_id:
            j = i
            while j < n and prompt_ids[j] == image_token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    if len(runs) != len(images):
        raise ValueError(f"the prompt has {len(runs)} image placeholder runs (token {image_token_id}) but "
                         f"{len(images)} images were given")
    offsets = []
    for k, (item, (start, length)) in enumerate(zip(images, runs)):
        if length != item.num_tokens:
            raise ValueError(f"image {k} has {item.num_tokens} tokens but its placeholder run has {length}")
        if item.offset not in (-1, start):
            raise ValueError(f"image {k} says offset {item.offset} but its placeholders start at {start}")
        offsets.append(start)
    return offsets


def mrope_positions(num_tokens: int, images: list[ImageItem], offsets: list[int],
                    merge_size: int) -> tuple[torch.Tensor, int]:
    """``[3, num_tokens]`` M-RoPE positions and the rope delta (transformers' ``get_rope_index``
    for still images): text runs count on from the previous maximum + 1 on all three axes; an
    image's tokens get (start, start + row, start + col) over its merged grid."""
    pieces: list[torch.Tensor] = []
    cursor = 0  # next prompt index
    next_pos = 0  # next text position
    for item, offset in zip(images, offsets):
        if offset > cursor:
            pieces.append(torch.arange(next_pos, next_pos + offset - cursor).expand(3, -1))
            next_pos += offset - cursor
        t, h, w = item.grid_thw
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + next_pos)
        next_pos += max(gh, gw)
        cursor = offset + item.num_tokens
    if num_tokens > cursor:
        pieces.append(torch.arange(next_pos, next_pos + num_tokens - cursor).expand(3, -1))
        next_pos += num_tokens - cursor
    positions = torch.cat(pieces, dim=1).to(torch.long).contiguous()
    return positions, next_pos - num_tokens


def build_multimodal_state(prompt_ids: list[int], images: list[ImageItem], image_token_id: int,
                           merge_size: int, hidden_size: int) -> MultimodalState:
    """Validate the images against the prompt and derive positions and hash ids (ValueError on
    any mismatch: wrong counts, grids, embedding shapes, missing pixels and embeddings)."""
    if not images:
        raise ValueError("images must be a non-empty list of ImageItem")
    for k, item in enumerate(images):
        if not isinstance(item, ImageItem):
            raise ValueError(f"image {k} is a {type(item).__name__}, not an ImageItem")
        t, h, w = item.grid_thw
        if min(t, h, w) <= 0 or h % merge_size or w % merge_size:
            raise ValueError(f"image {k} has grid_thw {item.grid_thw}; h and w must be positive multiples "
                             f"of merge_size {merge_size}")
        if item.num_tokens != t * h * w // merge_size**2:
            raise ValueError(f"image {k}: num_tokens {item.num_tokens} != t*h*w/merge^2 for grid {item.grid_thw}")
        if item.embeddings is not None:
            if tuple(item.embeddings.shape) != (item.num_tokens, hidden_size):
                raise ValueError(f"image {k}: embeddings shape {tuple(item.embeddings.shape)}, expected "
                                 f"({item.num_tokens}, {hidden_size})")
        elif item.pixel_values is None:
            raise ValueError(f"image {k} has neither pixel_values nor embeddings")
        elif item.pixel_values.dim() != 2 or item.pixel_values.shape[0] != t * h * w:
            raise ValueError(f"image {k}: pixel_values shape {tuple(item.pixel_values.shape)} does not hold "
                             f"t*h*w = {t * h * w} patches")
        if not item.content_hash:
            raise ValueError(f"image {k} has no content_hash")
    offsets = _locate(prompt_ids, images, image_token_id)
    for item, offset in zip(images, offsets):
        item.offset = offset
    positions, delta = mrope_positions(len(prompt_ids), images, offsets, merge_size)
    hash_ids = list(prompt_ids)
    for item in images:
        base = virtual_token_base(item.content_hash)
        hash_ids[item.offset : item.offset + item.num_tokens] = range(base, base + item.num_tokens)
    return MultimodalState(images=images, positions=positions, rope_delta=delta, hash_prompt_ids=hash_ids,
                           embeddings=[item.embeddings for item in images])


@dataclass
class MultimodalChunk:
    """One scheduled chunk of a sequence with images: its first row in the flat batch and the
    prompt/output indices ``[start, start + num_tokens)`` it computes."""

    row: int
    state: MultimodalState
    start: int
    num_tokens: int


def _overlapping(chunk: MultimodalChunk) -> list[int]:
    end = chunk.start + chunk.num_tokens
    return [k for k, item in enumerate(chunk.state.images)
            if item.offset < end and item.offset + item.num_tokens > chunk.start]


def encode_missing(model, chunks: list[MultimodalChunk], device: torch.device) -> int:
    """Run the vision tower once over every image this step needs and nobody has encoded yet (EP-D);
    returns how many images it encoded."""
    todo: dict[tuple[int, int], tuple[MultimodalState, int]] = {}
    for chunk in chunks:
        for k in _overlapping(chunk):
            if chunk.state.embeddings[k] is None:
                todo[(id(chunk.state), k)] = (chunk.state, k)
    if not todo:
        return 0
    jobs = list(todo.values())
    pixels = torch.cat([state.images[k].pixel_values for state, k in jobs]).to(device)
    encoded = model.encode_images(pixels, [state.images[k].grid_thw for state, k in jobs])
    for (state, k), embeddings in zip(jobs, encoded):
        state.embeddings[k] = embeddings
    return len(jobs)


def batch_inputs(chunks: list[MultimodalChunk], positions: list[int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[3, T]`` M-RoPE positions of the whole flat batch (text rows on all three axes), the
    batch rows that take image embeddings, and those embeddings (every needed image encoded)."""
    pos = torch.tensor(positions, dtype=torch.long).expand(3, -1).clone()
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    for chunk in chunks:
        state, start, n, row = chunk.state, chunk.start, chunk.num_tokens, chunk.row
        num_prompt = state.positions.shape[1]
        in_prompt = max(0, min(start + n, num_prompt) - start)
        if in_prompt:
            pos[:, row : row + in_prompt] = state.positions[:, start : start + in_prompt]
        if in_prompt < n:
            pos[:, row + in_prompt : row + n] += state.rope_delta
        for k in _overlapping(chunk):
            item = state.images[k]
            lo, hi = max(start, item.offset), min(start + n, item.offset + item.num_tokens)
            rows.append(torch.arange(row + lo - start, row + hi - start))
            embeds.append(state.embeddings[k][lo - item.offset : hi - item.offset].to(device))
    if rows:
        image_rows = torch.cat(rows).to(device)
        image_embeds = torch.cat(embeds)
    else:
        image_rows, image_embeds = torch.empty(0, dtype=torch.long, device=device), None
    return pos.to(device), image_rows, image_embeds
