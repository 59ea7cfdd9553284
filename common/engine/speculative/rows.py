"""A speculating sequence's sampler rows: one per draft position, each sampled as plain decoding
would sample that position, so that verification reuses the whole sampler unchanged.

Row ``j`` of a sequence with draft ``d`` sees the outputs so far plus ``d[:j]`` (penalties and
min_tokens count them) and, when seeded, draws the noise of its own sequence position: a seeded
speculative request yields exactly the tokens of the same request decoded plainly.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from common.engine.sampler import SeededGenerator, make_generator
from common.engine.sequence import Sequence

__all__ = ["DraftRows", "expand_draft_rows"]


@dataclass(slots=True)
class DraftRows:
    seqs: list[Sequence]  # the sequence of each row (repeated for its draft rows)
    output_ids: list[list[int]]
    generators: list[torch.Generator | None]


def expand_draft_rows(seqs: Seq[Sequence], drafts: Seq[Seq[int]]) -> DraftRows:
    rows = DraftRows([], [], [])
    for seq, draft in zip(seqs, drafts):
        outputs = seq.output_ids
        rows.seqs.append(seq)
        rows.output_ids.append(outputs)
        rows.generators.append(seq.generator)
        for j in range(1, len(draft) + 1):
            rows.seqs.append(seq)
            rows.output_ids.append(outputs + list(draft[:j]))
            generator = seq.generator
            if isinstance(generator, SeededGenerator):
                # Its own generator: the sampler seeks each row's to that row's position.
                generator = make_generator(generator.base_seed, generator.device)
            rows.generators.append(generator)
    return rows
