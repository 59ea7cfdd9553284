"""Sampling ops on a batch of logits (PyTorch reference; works on any device).

Every function takes a ``[B, V]`` float tensor and per-row parameter tensors of shape ``[B]``,
so one call covers the whole batch. Functions named ``apply_*`` modify ``logits`` in place and
return it; masked tokens become ``-inf``.

Order used by the sampler (vLLM's): penalties -> temperature -> min-p -> top-k -> top-p -> choice.
"""

from __future__ import annotations

import torch

from kernels.cpu_ext import cpu_ops_module

# top-p candidate search: start with this many tokens, grow x4, and sort the whole row once the
# candidates would exceed 1/_TOP_P_SORT_FRACTION of the vocabulary.
_TOP_P_FIRST_CANDIDATES = 256
_TOP_P_SORT_FRACTION = 8

__all__ = [
    "token_counts",
    "apply_penalties",
    "apply_temperature",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "mask_tokens",
    "greedy_choice",
    "exponential_race_choice",
    "exponential_noise",
    "logprobs_of",
]


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, V]`` int32 count of each token id in each row's list (one batched scatter)."""
    batch = len(token_lists)
    lengths = torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.int64)
    flat_tokens = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64)
    flat_index = torch.repeat_interleave(torch.arange(batch, dtype=torch.int64), lengths) * vocab_size + flat_tokens
    counts = torch.zeros(batch * vocab_size, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat_index.to(device), torch.ones(flat_index.shape[0], dtype=torch.int32, device=device))
    return counts.view(batch, vocab_size)


def apply_penalties(
    logits: torch.Tensor,
    prompt_counts: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """vLLM semantics.

    Repetition (multiplicative): a token seen in the prompt or the output has a positive logit
    divided by the penalty, a negative one multiplied by it. Frequency subtracts
    ``penalty * count`` and presence subtracts ``penalty`` for tokens seen in the output only.
    """
    seen = (prompt_counts > 0) | (output_counts > 0)
    repetition = repetition_penalties.to(logits.dtype).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits.copy_(torch.where(seen, penalized, logits))
    output_float = output_counts.to(logits.dtype)
    logits -= frequency_penalties.to(logits.dtype).unsqueeze(1) * output_float
    logits -= presence_penalties.to(logits.dtype).unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (callers pass 1.0 for greedy rows)."""
    logits /= temperatures.to(logits.dtype).unsqueeze(1)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max probability`` of their row.

    Done in log space: ``p < min_p * p_max`` iff ``logit < logit_max + log(min_p)``, so no softmax
    is needed; ``min_p == 0`` gives a threshold of ``-inf`` (nothing dropped).
    """
    threshold = logits.amax(dim=1, keepdim=True) + torch.log(min_p.to(logits.dtype)).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (``top_k >= V`` keeps everything; ties at the k-th
    value are all kept)."""
    vocab = logits.shape[1]
    k = top_k.clamp(1, vocab).to(device=logits.device, dtype=torch.int64)
    max_k = int(k.max())
    top_values = logits.topk(max_k, dim=1).values
    kth_value = top_values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill_(logits < kth_value, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches ``top_p``.

    A token is dropped when the mass of the tokens more likely than it already reaches ``top_p``,
    so the most likely token always stays. Rows with ``top_p >= 1`` are left alone (a cumulative
    sum that rounds above 1 would otherwise cut their tail).

    A full sort of the vocabulary is slow on CPU, and the nucleus is usually a few dozen tokens,
    so the candidates come from ``topk`` of a growing size: once the top-k mass of every row
    reaches its ``top_p`` the nucleus lies inside it (every token further down has at least that
    much mass before it) and the answer is exact. Only very flat rows fall back to the sort.
    """
    top_p = top_p.to(device=logits.device, dtype=logits.dtype)
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    vocab = logits.shape[1]
    probs = logits.softmax(dim=1)
    k = min(vocab, _TOP_P_FIRST_CANDIDATES)
    while True:
        if k * _TOP_P_SORT_FRACTION >= vocab:
            k = vocab
            top_probs, top_index = probs.sort(dim=1, descending=True, stable=True)
        else:
            top_probs, top_index = probs.topk(k, dim=1, sorted=True)
        cumulative = top_probs.cumsum(dim=1)
        covered = (cumulative[:, -1] >= top_p) | ~active
        if k == vocab or bool(covered.all()):
            break
        k *= 4
    keep_sorted = (cumulative - top_probs) < top_p.unsqueeze(1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_index, keep_sorted)
    return logits.masked_fill_(~keep & active.unsqueeze(1), float("-inf"))


def mask_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[int]) -> torch.Tensor:
    """Set ``logits[rows[i], token_ids[i]] = -inf`` for every pair."""
    if rows:
        row_index = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
        token_index = torch.as_tensor(token_ids, dtype=torch.int64, device=logits.device)
        logits[row_index, token_index] = float("-inf")
    return logits


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` argmax token ids (the first on ties); fp32 CPU logits through the C++ ``argmax_rows``
    (the same ids: torch's argmax streams 64 x 49152 logits at a third of memory speed)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
        ext = cpu_ops_module()
        if ext is not None:
            return ext.argmax_rows(logits)
    return logits.argmax(dim=1)


def exponential_noise(
    shape: tuple[int, int],
    generators: list[torch.Generator | None],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, V]`` Exponential(1) noise; rows with a generator draw from it alone.

    Unseeded rows share one batched draw from the global RNG; a seeded row draws its whole row
    from its own generator, so its noise does not depend on what else is in the batch.
    """
    # -log(U) with U ~ Uniform[0, 1) is Exponential(1), and several times cheaper on CPU than
    # Tensor.exponential_(); U = 0 gives +inf, which only means that token cannot win.
    seeded = [row for row, generator in enumerate(generators) if generator is not None]
    if len(seeded) < len(generators):
        uniform = torch.rand(shape, dtype=torch.float32, device=device)
    else:
        uniform = torch.empty(shape, dtype=torch.float32, device=device)
    for row in seeded:
        generator = generators[row]
        row_uniform = torch.rand(shape[1], dtype=torch.float32, device=generator.device, generator=generator)
        uniform[row] = row_uniform.to(device)
    return uniform.log_().neg_()


def exponential_race_choice(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from ``probs``: ``argmax(probs / E)`` with ``E ~ Exponential(1)``.

    The race is won by token i with probability ``probs[i]`` (``E_i / p_i`` are exponentials with
    rates ``p_i``; the smallest wins). Noise is clamped away from 0 so a masked token (p = 0)
    can never win through ``0 / 0``.
    """
    tiny = torch.finfo(noise.dtype).tiny
    return (probs / noise.clamp_min(tiny)).argmax(dim=1)


def logprobs_of(
    raw_logits: torch.Tensor, chosen: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's distribution (log_softmax of the raw logits).

    Returns ``(chosen_logprob [B], chosen_rank [B], top_logprobs [B, num_top], top_ids [B, num_top])``;
    rank is 1 + the number of tokens strictly more likely than the chosen one; the top lists are
    sorted from most to least likely.
    """
    logprobs = torch.log_softmax(raw_logits.float(), dim=1)
    chosen_logprob = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    rank = (logprobs > chosen_logprob.unsqueeze(1)).sum(dim=1) + 1
    if num_top > 0:
        top = logprobs.topk(num_top, dim=1, sorted=True)
        top_values, top_ids = top.values, top.indices
    else:
        top_values = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.int64, device=logprobs.device)
    return chosen_logprob, rank, top_values, top_ids
