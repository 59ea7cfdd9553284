"""One codec for every bus message: msgpack envelope + raw tensor frames, validated on decode.

Wire format of one message (a ZeroMQ multipart message, after any routing/topic frames):

    frame 0:     msgpack {"t": tag, "v": PROTOCOL_VERSION, "d": {field: value}, "x": [[dtype, shape], ...]}
    frame 1..n:  the raw bytes of tensor i (C-contiguous), one frame per "x" entry

Tensors never go inside msgpack: encode hands their memory to ZeroMQ as buffers (no copy for a
contiguous CPU tensor) and decode wraps the received frames with `torch.frombuffer` (no copy).
Decoded tensors share memory with the received frames and must be treated as read-only: copy
(or `index_copy_` into a pool) before writing in place. Conversely, a tensor handed to `encode`
must not be modified until ZeroMQ has sent it.

Every decode is validated against the message's dataclass annotations; anything wrong raises a
single exception type, `ProtocolError`, whose `reason` says what was wrong.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgpack
import torch

from common.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, Message, ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ProtocolError",
    "encode",
    "decode",
    "check_fields",
    "DTYPES",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Caps on what a header may declare, on top of "no more than the frame could hold".
_MAX_STR_LEN = 4 * 1024 * 1024
_MAX_ARRAY_LEN = 16 * 1024 * 1024
_MAX_MAP_LEN = 1024 * 1024
_MAX_TENSOR_DIMS = 8

_ENVELOPE_KEYS = frozenset(("t", "v", "d", "x"))

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# torch warns (once per process) that a read-only buffer gives a writable tensor; received
# ZeroMQ frames are read-only by nature and the module docstring states the contract, so
# consume that one-time warning here instead of at the first tensor a service receives.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(bytes(2), dtype=torch.uint8)


# ------------------------------------------------------------------ per-class field validators

Check = Callable[[Any], bool]


class _Schema(NamedTuple):
    field_names: tuple[str, ...]
    checks: dict[str, tuple[Check, str]]  # field -> (accepts value?, type name for errors)
    required: frozenset[str]
    float_fields: tuple[str, ...]  # scalar float fields: ints are accepted and converted


_SCHEMAS: dict[type, _Schema] = {}

# Scalar annotations and the exact runtime types msgpack decodes them to. bool is not an int
# here, and an int is accepted where a float is expected.
_SCALAR_TYPES: dict[Any, frozenset[type]] = {
    int: frozenset((int,)),
    float: frozenset((float, int)),
    str: frozenset((str,)),
    bool: frozenset((bool,)),
    bytes: frozenset((bytes,)),
    type(None): frozenset((type(None),)),
}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return "None" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "")


def _compile_check(annotation: Any) -> Check:
    """Build a fast predicate for one annotation (once per class, never per message)."""
    if annotation is Any:
        return lambda value: True
    scalar = _SCALAR_TYPES.get(annotation)
    if scalar is not None:
        if len(scalar) == 1:
            (only,) = scalar
            return lambda value: type(value) is only
        return lambda value: type(value) in scalar
    if annotation is list:
        return lambda value: type(value) is list
    if annotation is dict:
        return lambda value: type(value) is dict
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and len(args) == 1:
        element_scalar = _SCALAR_TYPES.get(args[0])
        if element_scalar is not None:
            # set(map(type, ...)) runs in C: fast enough for long token id lists.
            return lambda value: type(value) is list and set(map(type, value)) <= element_scalar
        element_check = _compile_check(args[0])
        return lambda value: type(value) is list and all(map(element_check, value))
    if origin is dict and len(args) == 2:
        key_check, value_check = _compile_check(args[0]), _compile_check(args[1])
        return lambda value: (
            type(value) is dict
            and all(map(key_check, value.keys()))
            and all(map(value_check, value.values()))
        )
    if origin in (typing.Union, types.UnionType):
        options = tuple(_compile_check(arg) for arg in args)
        return lambda value: any(option(value) for option in options)
    raise TypeError(f"unsupported message field annotation: {annotation!r}")


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is not None:
        return schema
    tag = getattr(cls, "TAG", None)
    if MESSAGE_TYPES.get(tag) is not cls:
        raise ProtocolError(f"{cls.__name__} is not a registered message type")
    hints = typing.get_type_hints(cls)
    checks: dict[str, tuple[Check, str]] = {}
    required: set[str] = set()
    float_fields: list[str] = []
    for message_field in dataclasses.fields(cls):
        annotation = hints[message_field.name]
        checks[message_field.name] = (_compile_check(annotation), _type_name(annotation))
        no_default = message_field.default is dataclasses.MISSING
        if no_default and message_field.default_factory is dataclasses.MISSING:
            required.add(message_field.name)
        if annotation is float or set(typing.get_args(annotation)) == {float, type(None)}:
            float_fields.append(message_field.name)
    schema = _Schema(tuple(checks), checks, frozenset(required), tuple(float_fields))
    _SCHEMAS[cls] = schema
    return schema


# Compile the built-in messages now so a bad annotation fails at import, not at the first
# message; messages registered later are compiled on first use.
for _cls in list(MESSAGE_TYPES.values()):
    _schema(_cls)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_fields(tag: str, schema: _Schema, fields: dict) -> None:
    checks = schema.checks
    for name, value in fields.items():
        entry = checks.get(name)
        if entry is None:
            raise ProtocolError(f"{tag}: unexpected field {_short(name)}")
        accepts, type_name = entry
        if not accepts(value):
            raise ProtocolError(
                f"{tag}: field {name!r} has the wrong type: expected {type_name}, "
                f"got {type(value).__name__} {_short(value)}"
            )
    if len(fields) < len(checks):
        missing = schema.required.difference(fields)
        if missing:
            raise ProtocolError(f"{tag}: missing required field(s) {', '.join(sorted(missing))}")


def check_fields(msg: Message) -> None:
    """Validate a message object's field values as decode would (for senders and tests)."""
    schema = _schema(type(msg))
    fields = {name: getattr(msg, name) for name in schema.field_names}
    _validate_fields(msg.TAG, schema, fields)


# ------------------------------------------------------------------------------------- encode


def _tensor_frame(tensor: torch.Tensor) -> tuple[list, memoryview | bytes]:
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"extra frames must be torch tensors, got {type(tensor).__name__}")
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise ProtocolError(f"tensor dtype {tensor.dtype} cannot travel on the bus")
    if tensor.layout is not torch.strided:
        raise ProtocolError(f"tensor layout {tensor.layout} cannot travel on the bus")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()  # a device tensor needs one copy to host memory in any case
    tensor = tensor.resolve_conj().resolve_neg().contiguous()  # no-ops for a plain tensor
    meta = [dtype_name, list(tensor.shape)]
    if tensor.numel() == 0:
        return meta, b""
    # A byte view makes every dtype (bfloat16 and float8 included) exportable through numpy's
    # buffer protocol; the memoryview keeps the tensor's storage alive until ZeroMQ is done.
    return meta, memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def encode(
    msg: Message, *tensors: torch.Tensor, max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES
) -> list[bytes | memoryview]:
    """Frames for one message: the msgpack envelope, then one raw frame per tensor.

    Field values are not type-checked here (that is decode's job; see `check_fields`), but a
    value msgpack cannot pack, an unregistered class or an oversize result raises ProtocolError.
    """
    if not isinstance(msg, Message):
        raise ProtocolError(f"not a bus message: {type(msg).__name__}")
    schema = _schema(type(msg))
    envelope: dict[str, Any] = {
        "t": msg.TAG,
        "v": PROTOCOL_VERSION,
        "d": {name: getattr(msg, name) for name in schema.field_names},
    }
    frames: list[bytes | memoryview] = [b""]
    if tensors:
        metas = []
        for tensor in tensors:
            meta, buffer = _tensor_frame(tensor)
            metas.append(meta)
            frames.append(buffer)
        envelope["x"] = metas
    try:
        frames[0] = msgpack.packb(envelope, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{msg.TAG}: cannot encode: {exc}") from exc
    if max_bytes is not None:
        total = sum(len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames)
        if total > max_bytes:
            raise ProtocolError(f"{msg.TAG}: message of {total} bytes exceeds the {max_bytes} limit")
    return frames


# ------------------------------------------------------------------------------------- decode


def _unpack_envelope(header: memoryview) -> Any:
    size = header.nbytes
    try:
        return msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=False,
            use_list=True,
            # Every element costs at least one byte, so nothing may declare more than the frame
            # holds; this keeps a tiny hostile frame from making msgpack preallocate gigabytes.
            max_str_len=min(size, _MAX_STR_LEN),
            max_bin_len=size,
            max_array_len=min(size, _MAX_ARRAY_LEN),
            max_map_len=min(size // 2, _MAX_MAP_LEN),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"frame 0 is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _decode_tensors(tag: str, metas: Any, frames: Sequence[memoryview]) -> list[torch.Tensor]:
    if type(metas) is not list:
        raise ProtocolError(f"{tag}: tensor metadata must be a list, got {type(metas).__name__}")
    if len(metas) != len(frames):
        raise ProtocolError(
            f"{tag}: {len(frames)} tensor frame(s) but metadata for {len(metas)}"
        )
    tensors = []
    for index, (meta, frame) in enumerate(zip(metas, frames)):
        if type(meta) is not list or len(meta) != 2:
            raise ProtocolError(f"{tag}: tensor {index} metadata must be [dtype, shape]")
        dtype_name, shape = meta
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise ProtocolError(f"{tag}: tensor {index} has unknown dtype {_short(dtype_name)}")
        if (
            type(shape) is not list
            or len(shape) > _MAX_TENSOR_DIMS
            or not all(type(dim) is int and dim >= 0 for dim in shape)
        ):
            raise ProtocolError(f"{tag}: tensor {index} has an invalid shape {_short(shape)}")
        expected = math.prod(shape) * dtype.itemsize
        if frame.nbytes != expected:
            raise ProtocolError(
                f"{tag}: tensor {index} frame has {frame.nbytes} bytes, "
                f"{dtype_name}{shape} needs {expected}"
            )
        if expected == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            tensors.append(torch.frombuffer(frame, dtype=dtype).view(shape))
    return tensors


def decode(
    frames: Sequence[Any], *, max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[Message, list[torch.Tensor]]:
    """Validate and decode one message's frames (bytes, memoryviews or zmq.Frame objects).

    Returns the message and its tensors (zero-copy views of the frames). Raises ProtocolError,
    and nothing else, for any malformed input.
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("no frames")
    try:
        # Flat byte views: sizes in bytes, and a non-contiguous buffer is refused here.
        views = [memoryview(frame).cast("B") for frame in frames]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"frames must be buffers: {exc}") from exc
    if max_bytes is not None:
        total = sum(view.nbytes for view in views)
        if total > max_bytes:
            raise ProtocolError(f"message of {total} bytes exceeds the {max_bytes} limit")

    envelope = _unpack_envelope(views[0])
    if type(envelope) is not dict:
        raise ProtocolError(f"frame 0 must be a msgpack map, got {type(envelope).__name__}")
    unknown_keys = envelope.keys() - _ENVELOPE_KEYS
    if unknown_keys:
        raise ProtocolError(f"unexpected envelope key(s) {_short(sorted(map(repr, unknown_keys)))}")
    version = envelope.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"wrong protocol version {_short(version)}, expected {PROTOCOL_VERSION}")
    tag = envelope.get("t")
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_short(tag)}")
    fields = envelope.get("d")
    if type(fields) is not dict:
        raise ProtocolError(f"{tag}: fields must be a map, got {type(fields).__name__}")

    schema = _schema(cls)
    _validate_fields(tag, schema, fields)
    for name in schema.float_fields:
        if type(fields.get(name)) is int:
            fields[name] = float(fields[name])
    tensors = _decode_tensors(tag, envelope.get("x", []), views[1:])
    return cls(**fields), tensors
