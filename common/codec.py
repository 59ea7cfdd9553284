"""One codec for every bus message: a msgpack envelope + raw tensor frames, validated on decode.

Wire format of one message (a ZeroMQ multipart message, after any routing/topic frames):

    frame 0:     msgpack {"t": tag, "v": PROTOCOL_VERSION, "d": {field: value}, "x": [[dtype, shape], ...]}
    frame 1..n:  the raw bytes of tensor i (C-contiguous), one frame per "x" entry

Messages are `msgspec` structs (`common.protocol`), so msgspec packs them and, on decode, checks
every field against its annotation in C (missing, unknown or mistyped fields, nested records
too). Decoding goes in two steps: the envelope first, with "d" kept as raw bytes, then the tag's
class from those bytes; a socket bound to a channel end refuses a tag that does not belong there
between the two, before any field is decoded.

Tensors never go inside msgpack: encode hands their memory to ZeroMQ as buffers (no copy for a
contiguous CPU tensor) and decode wraps the received frames with `torch.frombuffer` (no copy).
Decoded tensors share memory with the received frames and must be treated as read-only: copy
(or `index_copy_` into a pool) before writing in place. Conversely, a tensor handed to `encode`
must not be modified until ZeroMQ has sent it.

Anything wrong raises a single exception type, `ProtocolError`, whose `reason` says what was
wrong in the project's words (msgspec's messages are translated: they only name a path).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from common.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, ChannelEnd, Message, ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ProtocolError",
    "Refused",
    "REFUSAL_KINDS",
    "encode",
    "decode",
    "check_fields",
    "DTYPES",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_MAX_TENSOR_DIMS = 8

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


class _Outgoing(msgspec.Struct, omit_defaults=True):
    t: str
    v: int
    d: Any
    x: list | None = None


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    # Loosely typed on purpose: a wrong tag or version gets its own reason (checked by hand),
    # and "d" stays undecoded until the tag says which class it is.
    t: Any = None
    v: Any = None
    d: msgspec.Raw = msgspec.Raw(msgspec.msgpack.encode(None))
    x: Any = None


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(_Envelope, ext_hook=_refuse_ext)
_ANY_DECODER = msgspec.msgpack.Decoder(ext_hook=_refuse_ext)
_DECODERS: dict[type[Message], msgspec.msgpack.Decoder] = {}


def _decoder(cls: type[Message]) -> msgspec.msgpack.Decoder:
    decoder = _DECODERS.get(cls)
    if decoder is None:
        if MESSAGE_TYPES.get(getattr(cls, "TAG", None)) is not cls:
            raise ProtocolError(f"{cls.__name__} is not a registered message type")
        decoder = _DECODERS[cls] = msgspec.msgpack.Decoder(cls, ext_hook=_refuse_ext)
    return decoder


# Build the decoders of the built-in messages now so a bad annotation fails at import, not at
# the first message; messages registered later get theirs on first use.
for _cls in list(MESSAGE_TYPES.values()):
    _decoder(_cls)


# ------------------------------------------------------------------------- error reasons

# msgspec: "<what>" or "<what> - at `$.path`" or "<what> - at `key` in `$.path`".
_MSGSPEC_ERROR = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`(?: in `(?P<container>[^`]*)`)?)?$", re.S)
_BACKTICKED = re.compile(r"`([^`]*)`")
_INDEXES = re.compile(r"\[[^\]]*\]")
_MODULE_PREFIX = re.compile(r"\b(?:[a-z_][\w]*\.)+(?=[A-Z])")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return "None" if annotation is type(None) else annotation.__name__
    return _MODULE_PREFIX.sub("", str(annotation).replace("typing.", ""))


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of `dotted` ("sampling.stop") inside struct `cls`, or None."""
    annotation: Any = cls
    for name in dotted.split("."):
        if not (isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)):
            return None
        info = next((f for f in msgspec.structs.fields(annotation) if f.name == name), None)
        if info is None:
            return None
        annotation = info.type
    return annotation


def _untyped_fields(raw: Any) -> dict | None:
    """The fields of a refused message as plain msgpack values, when they are a map at all."""
    try:
        fields = _ANY_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError, RecursionError):
        return None
    return fields if isinstance(fields, dict) else None


def _non_string_key(raw: Any) -> str:
    for key in _untyped_fields(raw) or ():
        if type(key) is not str:
            return _short(key)
    return "(not a string)"


def _field_reason(tag: str, cls: type, raw: Any, error: msgspec.ValidationError) -> str:
    """`error` (decoding the fields of a `tag` message) in the words of a bus log line."""
    parts = _MSGSPEC_ERROR.match(str(error))
    what, path, container = parts["what"], parts["path"], parts["container"]
    named = _BACKTICKED.findall(what)
    if path == "key":  # a map key that is not a string: never a field name
        where = (container or "$")[2:]
        key = _non_string_key(raw) if not where else "(not a string)"
        return f"{tag}: unexpected field {key}" + (f" in {where}" if where else "")
    where = (path or "$")[2:]  # "" at the message itself, else "sampling", "prompt_ids[1]"...
    inside = f" in {where}" if where else ""
    if what.startswith("Object missing required field") and named:
        return f"{tag}: missing required field(s) {named[0]}{inside}"
    if what.startswith("Object contains unknown field") and named:
        return f"{tag}: unexpected field {named[0]!r}{inside}"
    if what.startswith("Expected `object`") and not where:
        return f"{tag}: fields must be a map, got {named[-1] if named else 'something else'}"
    if not where:
        return f"{tag}: {what}"
    # Name the field (or record field) that holds the bad value, with its declared type.
    field = _INDEXES.sub("", where)
    annotation = _field_type(cls, field)
    located = "" if where == field else f" at {where}"
    if what.startswith("Expected") and annotation is not None:
        got = named[-1] if len(named) >= 2 else "something else"
        return f"{tag}: field {field!r} has the wrong type: expected {_type_name(annotation)}, got {got}{located}"
    return f"{tag}: field {field!r} is invalid: {what}{located}"


def _envelope_reason(header: memoryview, error: msgspec.ValidationError) -> str:
    parts = _MSGSPEC_ERROR.match(str(error))
    what, path = parts["what"], parts["path"]
    named = _BACKTICKED.findall(what)
    if path is None and what.startswith("Expected `object`"):
        # msgspec checks a value's type before its length: tell a complete non-map value from
        # bytes that are no msgpack at all (e.g. a header declaring more than the frame holds).
        try:
            _ANY_DECODER.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
            return f"frame 0 is not valid msgpack: {exc}"
        return f"frame 0 must be a msgpack map, got {named[-1] if named else 'something else'}"
    if what.startswith("Object contains unknown field") and named:
        return f"unexpected envelope key {named[0]!r}"
    if path == "key":
        return "unexpected envelope key (not a string)"
    return f"malformed envelope: {what}" + (f" at {path}" if path else "")


def check_fields(msg: Message) -> None:
    """Validate a message object's field values as decode would (for senders and tests):
    constructing a struct does not check types, decoding does."""
    cls = type(msg)
    decoder = _decoder(cls)
    try:
        raw = _ENCODER.encode(msg)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise ProtocolError(f"{msg.TAG}: cannot encode: {exc}") from exc
    try:
        decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(_field_reason(msg.TAG, cls, raw, exc)) from exc


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
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TAG", None)) is not cls:
        raise ProtocolError(f"{cls.__name__} is not a registered message type")
    frames: list[bytes | memoryview] = [b""]
    metas: list | None = None
    if tensors:
        metas = []
        for tensor in tensors:
            meta, buffer = _tensor_frame(tensor)
            metas.append(meta)
            frames.append(buffer)
    try:
        frames[0] = _ENCODER.encode(_Outgoing(t=msg.TAG, v=PROTOCOL_VERSION, d=msg, x=metas))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise ProtocolError(f"{msg.TAG}: cannot encode: {exc}") from exc
    if max_bytes is not None:
        total = len(frames[0]) if len(frames) == 1 else sum(
            len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames)
        if total > max_bytes:
            raise ProtocolError(f"{msg.TAG}: message of {total} bytes exceeds the {max_bytes} limit")
    return frames


# ------------------------------------------------------------------------------------- decode

# What `Refused.kind` can be: few and fixed, so that counting drops by kind (a metric label) stays
# bounded whatever a peer sends.
REFUSAL_KINDS = ("framing", "oversize", "malformed", "version", "unknown_type", "wrong_channel", "fields",
                 "tensors")


class Refused(ProtocolError):
    """A message `decode` refused, with `kind` (one of REFUSAL_KINDS) beside the reason in words."""

    def __init__(self, kind: str, reason: str, *, tag: str | None = None, fields: dict | None = None) -> None:
        super().__init__(reason, tag=tag, fields=fields)
        self.kind = kind


def _decode_tensors(tag: str, metas: Any, frames: Sequence[memoryview]) -> list[torch.Tensor]:
    if type(metas) is not list:
        raise Refused("tensors", f"{tag}: tensor metadata must be a list, got {type(metas).__name__}")
    if len(metas) != len(frames):
        raise Refused("tensors", f"{tag}: {len(frames)} tensor frame(s) but metadata for {len(metas)}")
    tensors = []
    for index, (meta, frame) in enumerate(zip(metas, frames)):
        if type(meta) is not list or len(meta) != 2:
            raise Refused("tensors", f"{tag}: tensor {index} metadata must be [dtype, shape]")
        dtype_name, shape = meta
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise Refused("tensors", f"{tag}: tensor {index} has unknown dtype {_short(dtype_name)}")
        if (
            type(shape) is not list
            or len(shape) > _MAX_TENSOR_DIMS
            or not all(type(dim) is int and dim >= 0 for dim in shape)
        ):
            raise Refused("tensors", f"{tag}: tensor {index} has an invalid shape {_short(shape)}")
        expected = math.prod(shape) * dtype.itemsize
        if frame.nbytes != expected:
            raise Refused(
                "tensors",
                f"{tag}: tensor {index} frame has {frame.nbytes} bytes, "
                f"{dtype_name}{shape} needs {expected}"
            )
        if expected == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            tensors.append(torch.frombuffer(frame, dtype=dtype).view(shape))
    return tensors


def decode(
    frames: Sequence[Any],
    *,
    max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    accept: ChannelEnd | None = None,
) -> tuple[Message, list[torch.Tensor]]:
    """Validate and decode one message's frames (bytes, memoryviews or zmq.Frame objects).

    Returns the message and its tensors (zero-copy views of the frames). With `accept`, a
    message that does not travel to that channel end is refused before its fields are decoded.
    Raises ProtocolError, and nothing else, for any malformed or refused input.
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        raise Refused("framing", "no frames")
    try:
        # Flat byte views: sizes in bytes, and a non-contiguous buffer is refused here.
        views = [memoryview(frame).cast("B") for frame in frames]
    except (TypeError, ValueError) as exc:
        raise Refused("framing", f"frames must be buffers: {exc}") from exc
    if max_bytes is not None:
        total = views[0].nbytes if len(views) == 1 else sum(view.nbytes for view in views)
        if total > max_bytes:
            raise Refused("oversize", f"message of {total} bytes exceeds the {max_bytes} limit")

    header = views[0]
    try:
        envelope = _ENVELOPE_DECODER.decode(header)
    except msgspec.ValidationError as exc:
        raise Refused("malformed", _envelope_reason(header, exc)) from exc
    except (msgspec.DecodeError, ValueError) as exc:
        raise Refused("malformed", f"frame 0 is not valid msgpack: {exc}") from exc
    except RecursionError:  # msgspec's own depth limit: nothing legitimate nests that deep
        raise Refused("malformed", "frame 0 is nested too deeply") from None
    version = envelope.v
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Refused("version", f"wrong protocol version {_short(version)}, expected {PROTOCOL_VERSION}")
    tag = envelope.t
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise Refused("unknown_type", f"unknown message type {_short(tag)}")
    if accept is not None and tag not in accept.inbound_tags:
        raise Refused("wrong_channel", accept.refusal(tag))
    try:
        msg = (_DECODERS.get(cls) or _decoder(cls)).decode(envelope.d)
    except msgspec.ValidationError as exc:
        raise Refused("fields", _field_reason(tag, cls, envelope.d, exc), tag=tag,
                      fields=_untyped_fields(envelope.d)) from exc
    except (msgspec.DecodeError, ValueError) as exc:
        raise Refused("fields", f"{tag}: fields are not valid msgpack: {exc}", tag=tag) from exc
    except RecursionError:
        raise Refused("fields", f"{tag}: fields are nested too deeply", tag=tag) from None
    if envelope.x is None and len(views) == 1:
        return msg, []  # the common case: no tensors
    return msg, _decode_tensors(tag, [] if envelope.x is None else envelope.x, views[1:])
