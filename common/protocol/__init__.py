"""Every message that travels on the bus, by channel (DESIGN.md §2).

`from common.protocol import X` works for every message, record, channel and helper; the
channel modules (`frontend`, `backend`, `control`, `kv`, `kvstore`, `tokens`) each define their
channel, its base class and its messages. `__all__` is derived from what those modules register.
"""

from __future__ import annotations

from common.protocol import backend, base, control, embedding, encode, frontend, image, kv, kvstore, sampling, tokens
from common.protocol.backend import *  # noqa: F403
from common.protocol.base import *  # noqa: F403
from common.protocol.base import check_channels
from common.protocol.control import *  # noqa: F403
from common.protocol.embedding import *  # noqa: F403
from common.protocol.encode import *  # noqa: F403
from common.protocol.frontend import *  # noqa: F403
from common.protocol.image import *  # noqa: F403
from common.protocol.kv import *  # noqa: F403
from common.protocol.kvstore import *  # noqa: F403
from common.protocol.sampling import *  # noqa: F403
from common.protocol.tokens import *  # noqa: F403

check_channels(base.MESSAGE_TYPES.values())

_MODULES = (base, sampling, embedding, image, encode, frontend, backend, control, kv, kvstore, tokens)
_EXPORTED = {name for module in _MODULES for name in module.__all__}
_MESSAGES = {cls.__name__ for cls in base.MESSAGE_TYPES.values()}
if _MESSAGES - _EXPORTED:  # a registered message its module forgot to export
    raise TypeError(f"message(s) missing from their module's __all__: {sorted(_MESSAGES - _EXPORTED)}")

# Every registered message, plus the channels, base classes, records and helpers.
__all__ = sorted(_MESSAGES | _EXPORTED)
