"""An Assign whose images came with it: the message and its raw image frames, queued together.

The frames of a multimodal Assign (one per `Assign.images` entry, see `common.image_frames`) are
not part of the message object, so the inbox queues both as one piece of engine work; the request
book rebuilds the `ImageItem`s when it adds the request (a mismatch is that request's 400).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.protocol import Assign

__all__ = ["ImageAssign"]


@dataclass(eq=False)
class ImageAssign:
    msg: Assign
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.msg.request_id
