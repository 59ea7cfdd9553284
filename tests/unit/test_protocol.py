"""Bus messages and the codec: round trips, tensor frames, validation, fuzzing."""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack
import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol
from common.codec import DTYPES, check_fields, decode, encode
from common.engine.sampling_params import SamplingParams
from common.protocol import (
    BACKEND,
    CHANNELS,
    CONTROL,
    FRONTEND,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TOKENS,
    BackendMessage,
    FinishChoice,
    Heartbeat,
    KvTransferAck,
    KvTransferChunk,
    Message,
    ProtocolError,
    Sampling,
    Submit,
    TokenDelta,
)

ALL_CLASSES = sorted(MESSAGE_TYPES.values(), key=lambda cls: cls.TAG)


# ------------------------------------------------------------------ building valid messages

_SCALAR_STRATEGIES = {
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(allow_nan=False),
    str: st.text(max_size=20),
    bool: st.booleans(),
    bytes: st.binary(max_size=20),
}
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


def fields_of(cls: type) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(cls)


def is_record(annotation: typing.Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def strategy_for(annotation: typing.Any) -> st.SearchStrategy:
    if is_record(annotation):
        return message_strategy(annotation)
    if annotation in _SCALAR_STRATEGIES:
        return _SCALAR_STRATEGIES[annotation]
    if annotation is list:
        return st.lists(_JSONISH, max_size=4)
    if annotation is dict:
        return st.dictionaries(st.text(max_size=6), _JSONISH, max_size=4)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=6)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=4)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([st.none() if arg is type(None) else strategy_for(arg) for arg in args])
    raise AssertionError(f"no strategy for {annotation!r}")


def message_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy:
    return st.builds(cls, **{f.name: strategy_for(f.type) for f in fields_of(cls)})


_SIMPLE_VALUES = {int: 7, float: 0.5, str: "abc", bool: True, bytes: b"\x00\xff", list: [1, "x"], dict: {"k": [1, 2]}}


def simple_value(annotation: typing.Any) -> typing.Any:
    if is_record(annotation):
        return example(annotation)
    if annotation in _SIMPLE_VALUES:
        return _SIMPLE_VALUES[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [simple_value(args[0]), simple_value(args[0])]
    if origin is dict:
        return {simple_value(args[0]): simple_value(args[1])}
    if origin in (typing.Union, types.UnionType):
        return simple_value(next(arg for arg in args if arg is not type(None)))
    raise AssertionError(f"no example for {annotation!r}")


def example(cls: type[msgspec.Struct]) -> typing.Any:
    return cls(**{f.name: simple_value(f.type) for f in fields_of(cls)})


def envelope(tag: str, fields: dict, **extra: typing.Any) -> bytes:
    return msgpack.packb({"t": tag, "v": PROTOCOL_VERSION, "d": fields, **extra})


def submit_fields(**overrides: typing.Any) -> dict:
    fields = dict(
        request_id="r1",
        prompt_ids=[1, 2, 3],
        sampling={"temperature": 0.7},
        priority="online",
        gateway_id="g1",
        tokens_addr="ipc:///tmp/g1",
        arrival_time=12.5,
    )
    fields.update(overrides)
    return fields


# ------------------------------------------------------------------------------- messages


def test_registry_covers_the_designed_messages() -> None:
    expected = {
        "Submit", "Abort", "StatusQuery", "StatusReply", "GatewayHello", "Register", "RegisterAck",
        "Heartbeat", "Deregister", "Assign", "AbortRequest", "RequestFinished", "TokenDelta",
        "RequestError", "RoleFlip", "FlipAck", "Drain", "Shutdown", "KvTransferChunk", "KvTransferAck",
        "KvTransferBegin", "KvTransferReady", "RequestHandoff", "KvEvent", "KvPut", "KvGet", "KvGetReply",
    }
    assert expected <= {cls.__name__ for cls in ALL_CLASSES}
    for tag, cls in MESSAGE_TYPES.items():
        assert cls.TAG == tag
        assert issubclass(cls, msgspec.Struct) and hasattr(cls, "__slots__")
        assert not hasattr(example(cls), "__dict__")  # slots: no per-instance dict


def test_messages_are_keyword_only_and_defaults_apply() -> None:
    with pytest.raises(TypeError):
        protocol.Abort("r1", "gone")  # type: ignore[misc]
    submit = Submit(**{k: v for k, v in submit_fields().items() if k != "priority"})
    assert submit.priority == "online"
    assert TokenDelta(
        request_id="r", index=0, token_ids=[], logprobs=None, finish_reason=None,
        num_prompt_tokens=1, num_output_tokens=0,
    ).cached_tokens == 0


def test_register_rejects_a_reused_tag() -> None:
    class Impostor(Message):
        TAG: typing.ClassVar[str] = "submit"

    with pytest.raises(TypeError, match="already used"):
        protocol.register(Impostor)
    assert MESSAGE_TYPES["submit"] is Submit


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda cls: cls.TAG)
def test_every_message_round_trips(cls: type[Message]) -> None:
    msg = example(cls)
    frames = encode(msg)
    assert len(frames) == 1 and isinstance(frames[0], bytes)
    decoded, tensors = decode(frames)
    assert type(decoded) is cls and decoded == msg and tensors == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_CLASSES).flatmap(message_strategy))
def test_random_valid_messages_round_trip(msg: Message) -> None:
    check_fields(msg)
    decoded, _ = decode(encode(msg))
    assert decoded == msg


def test_defaulted_field_may_be_absent_on_the_wire_and_ints_widen_to_float() -> None:
    fields = submit_fields(arrival_time=3)
    del fields["priority"]
    msg, _ = decode([envelope("submit", fields)])
    assert msg.priority == "online"
    assert msg.arrival_time == 3.0 and type(msg.arrival_time) is float


# -------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8])
def test_tensors_round_trip_with_dtype_and_shape(dtype: torch.dtype) -> None:
    source = (torch.randn(2, 3, 4) * 10).to(dtype)
    header = KvTransferChunk(transfer_id="r", layer_start=0, num_layers=2, last=True)
    frames = encode(header, source, torch.arange(5))
    assert len(frames) == 3
    decoded, tensors = decode([bytes(frame) for frame in frames])
    assert decoded == header
    assert tensors[0].dtype == dtype and tensors[0].shape == (2, 3, 4)
    assert torch.equal(tensors[0], source)
    assert torch.equal(tensors[1], torch.arange(5))


def test_empty_scalar_and_non_contiguous_tensors_round_trip() -> None:
    matrix = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sources = [torch.empty(0, 5, dtype=torch.bfloat16), torch.tensor(3.5), matrix.t(), matrix[:, 1]]
    _, tensors = decode(encode(KvTransferAck(transfer_id="r", ok=True), *sources))
    for got, want in zip(tensors, sources):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_tensor_frames_are_zero_copy_on_both_sides() -> None:
    source = torch.randn(64, 32).to(torch.bfloat16)
    frames = encode(KvTransferAck(transfer_id="r", ok=True), source)
    # The send frame is the tensor's own memory, and decode wraps that memory as it is.
    _, (through_views,) = decode(frames)
    assert through_views.data_ptr() == source.data_ptr()

    received = bytearray(frames[1])
    _, (received_tensor,) = decode([frames[0], received])
    received[0:2] = torch.tensor([1.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert received_tensor[0, 0].item() == 1.0  # shares the frame's buffer, no copy

    zmq_frames = [zmq.Frame(bytes(frame)) for frame in frames]
    _, (from_zmq,) = decode(zmq_frames)
    del zmq_frames
    assert torch.equal(from_zmq, source)  # the tensor keeps the zmq frame alive


def test_encode_refuses_what_cannot_travel() -> None:
    ack = KvTransferAck(transfer_id="r", ok=True)
    with pytest.raises(ProtocolError, match="dtype"):
        encode(ack, torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ProtocolError, match="torch tensors"):
        encode(ack, b"raw")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(KvTransferAck(transfer_id=object(), ok=True))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="not a bus message"):
        encode({"t": "submit"})  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(ack, torch.zeros(1000), max_bytes=1000)

    class Unregistered(Message):
        TAG: typing.ClassVar[str] = "unregistered-test"

    with pytest.raises(ProtocolError, match="not a registered"):
        encode(Unregistered())


def test_check_fields_catches_a_mistyped_message_before_sending() -> None:
    check_fields(example(Heartbeat))
    with pytest.raises(ProtocolError, match="free_pages"):
        check_fields(msgspec.structs.replace(example(Heartbeat), free_pages="many"))


# ----------------------------------------------------------------------------- validation

_KV_META = [["float32", [2, 2]]]
_BAD_INPUTS: dict[str, tuple[list, str]] = {
    "no frames": ([], "no frames"),
    "not a buffer": ([123], "must be buffers"),
    "not msgpack": ([b"\xc1\x00"], "not valid msgpack"),
    "truncated msgpack": ([msgpack.packb({"t": "submit"})[:-2]], "not valid msgpack"),
    "not a map": ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
    "unknown tag": ([envelope("launch_missiles", {})], "unknown message type 'launch_missiles'"),
    "tag not a string": ([envelope(7, {})], "unknown message type 7"),  # type: ignore[arg-type]
    "wrong version": ([msgpack.packb({"t": "shutdown", "v": PROTOCOL_VERSION + 1, "d": {}})], "wrong protocol version 2"),
    "bool version": ([msgpack.packb({"t": "shutdown", "v": True, "d": {}})], "wrong protocol version True"),
    "missing version": ([msgpack.packb({"t": "shutdown", "d": {}})], "wrong protocol version None"),
    "extra envelope key": ([envelope("shutdown", {}, z=1)], "unexpected envelope key"),
    "fields not a map": ([envelope("shutdown", [])], "fields must be a map"),  # type: ignore[arg-type]
    "missing field": ([envelope("abort", {"request_id": "r"})], "abort: missing required field(s) reason"),
    "unexpected field": ([envelope("abort", {"request_id": "r", "reason": "x", "evil": 1})], "abort: unexpected field 'evil'"),
    "non-string field key": ([envelope("abort", {"request_id": "r", "reason": "x", 5: 1})], "unexpected field 5"),
    "str for int list": ([envelope("submit", submit_fields(prompt_ids=[1, "2"]))], "'prompt_ids' has the wrong type: expected list[int]"),
    "bool is not int": ([envelope("drain", {"instance_id": True})], "'instance_id' has the wrong type: expected str"),
    "bool in int list": ([envelope("submit", submit_fields(prompt_ids=[1, True]))], "expected list[int]"),
    "str for float": ([envelope("submit", submit_fields(arrival_time="now"))], "'arrival_time' has the wrong type: expected float"),
    "None for required": ([envelope("submit", submit_fields(sampling=None))], "'sampling' has the wrong type: expected Sampling"),
    "int for optional list": (
        [envelope("token_delta", dict(request_id="r", index=0, token_ids=[1], logprobs=5, finish_reason=None, num_prompt_tokens=1, num_output_tokens=1))],
        "'logprobs' has the wrong type: expected list | None",
    ),
    "bytes for str": ([envelope("drain", {"instance_id": b"w1"})], "expected str, got bytes"),
    "frame without metadata": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}), b"\x00" * 16], "1 tensor frame(s) but metadata for 0"),
    "metadata without frame": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x=_KV_META)], "0 tensor frame(s) but metadata for 1"),
    "tensor size mismatch": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x=_KV_META), b"\x00" * 15], "frame has 15 bytes, float32[2, 2] needs 16"),
    "unknown dtype": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x=[["float128", [1]]]), b"\x00" * 16], "unknown dtype 'float128'"),
    "negative dim": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x=[["uint8", [-1]]]), b""], "invalid shape"),
    "metadata not a list": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x={"a": 1}), b""], "tensor metadata must be a list"),
    "malformed metadata entry": ([envelope("kv_transfer_ack", {"transfer_id": "r", "ok": True}, x=[["uint8"]]), b""], "must be [dtype, shape]"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS), ids=list(_BAD_INPUTS))
def test_each_validation_failure_raises_protocol_error_with_a_reason(case: str) -> None:
    frames, reason = _BAD_INPUTS[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert reason in info.value.reason


def test_oversize_message_is_refused_before_parsing() -> None:
    frames = encode(Submit(**submit_fields(prompt_ids=list(range(1000)))))
    assert decode(frames, max_bytes=10_000)[0].prompt_ids == list(range(1000))
    with pytest.raises(ProtocolError, match="exceeds the 1000 limit"):
        decode(frames, max_bytes=1000)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode([frames[0], b"\x00" * 2000], max_bytes=1000)


def test_hostile_declared_lengths_do_not_allocate() -> None:
    # array32 header declaring 2**32-1 elements in a 5-byte frame
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode([b"\xdd\xff\xff\xff\xff"])
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode([b"\xdf\xff\xff\xff\xff"])


# ----------------------------------------------------------------------------------- fuzz


def _decode_or_protocol_error(frames: list) -> None:
    try:
        msg, tensors = decode(frames)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert isinstance(msg, Message) and isinstance(tensors, list)


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_fuzz_random_bytes_only_raise_protocol_error(frames: list[bytes]) -> None:
    _decode_or_protocol_error(frames)


_MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(children.filter(lambda v: not isinstance(v, (list, dict))), children, max_size=4),
    max_leaves=12,
)


@_FUZZ
@given(_MSGPACK_VALUES, st.lists(st.binary(max_size=32), max_size=2))
def test_fuzz_random_msgpack_only_raises_protocol_error(value: typing.Any, extra: list[bytes]) -> None:
    _decode_or_protocol_error([msgpack.packb(value), *extra])


_FIELD_NAMES = sorted({f.name for cls in ALL_CLASSES for f in fields_of(cls)})


@_FUZZ
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _MSGPACK_VALUES, max_size=10),
    st.one_of(st.none(), st.lists(st.lists(_MSGPACK_VALUES, max_size=3), max_size=2)),
    st.lists(st.binary(max_size=32), max_size=2),
)
def test_fuzz_envelopes_with_random_fields_only_raise_protocol_error(
    tag: str, fields: dict, metas: typing.Any, extra: list[bytes]
) -> None:
    header = {"t": tag, "v": PROTOCOL_VERSION, "d": fields}
    if metas is not None:
        header["x"] = metas
    _decode_or_protocol_error([msgpack.packb(header), *extra])


# --------------------------------------------------------------------------- typed records


def test_sampling_record_mirrors_sampling_params() -> None:
    # Same fields, order and defaults: the gateway builds the record from SamplingParams and a
    # worker turns it back, so the two must not drift apart.
    assert list(Sampling().to_dict()) == [f.name for f in dataclasses.fields(SamplingParams)]
    assert Sampling().to_dict() == SamplingParams().to_dict()
    params = SamplingParams(temperature=0.2, stop=["x"], stop_token_ids=[7], seed=3, max_tokens=None, logprobs=2)
    record, _ = decode(encode(Submit(**submit_fields(sampling=Sampling(**params.to_dict())))))
    assert SamplingParams.from_dict(record.sampling.to_dict()) == params


def test_nested_record_fields_are_validated_at_decode() -> None:
    cases = {
        "temperature": ({"temperature": "hot"}, "field 'sampling.temperature' has the wrong type: expected float"),
        "stop": ({"stop": ["ok", 3]}, "field 'sampling.stop' has the wrong type: expected list[str]"),
        "misspelt": ({"tempertaure": 0.5}, "unexpected field 'tempertaure' in sampling"),
        "non-string key": ({1: 0.5}, "unexpected field (not a string) in sampling"),
    }
    for name, (sampling, reason) in cases.items():
        with pytest.raises(ProtocolError) as info:
            decode([envelope("submit", submit_fields(sampling=sampling))])
        assert reason in info.value.reason, name
    msg, _ = decode([envelope("submit", submit_fields(sampling={"temperature": 1, "n": 2}))])
    assert msg.sampling == Sampling(temperature=1.0, n=2) and type(msg.sampling.temperature) is float


def test_heartbeat_routing_fields_are_typed() -> None:
    beat = example(Heartbeat)
    fields = msgspec.structs.asdict(beat)
    for name in ("draining", "flipping", "queued_prefill_tokens", "max_num_seqs", "kv_namespace", "used_pages"):
        wrong = {**fields, name: [1]}
        with pytest.raises(ProtocolError, match=f"'{name}' has the wrong type"):
            decode([envelope("heartbeat", wrong)])
        missing = {key: value for key, value in fields.items() if key != name}
        with pytest.raises(ProtocolError, match=f"missing required field\\(s\\) {name}"):
            decode([envelope("heartbeat", missing)])


# -------------------------------------------------------------------------------- channels


def test_every_message_travels_on_a_channel_of_its_base_class() -> None:
    for cls in ALL_CLASSES:
        channels = [channel for channel in CHANNELS.values() if cls in channel.messages()]
        assert channels, cls.__name__
        assert all(issubclass(cls, channel.base) for channel in channels), cls.__name__
    # One class on two channels, in different directions.
    assert FinishChoice in FRONTEND.binder.inbound and FinishChoice in BACKEND.connector.inbound
    assert FinishChoice not in FRONTEND.connector.inbound and FinishChoice not in BACKEND.binder.inbound
    assert Heartbeat in BACKEND.binder.inbound and Heartbeat in BACKEND.connector.outbound
    assert not CONTROL.binder.inbound  # orders only: nothing travels back on the PUB


def test_a_channel_end_refuses_what_does_not_travel_to_it() -> None:
    frames = encode(example(Heartbeat))
    assert type(decode(frames, accept=BACKEND.binder)[0]) is Heartbeat
    with pytest.raises(ProtocolError) as info:
        decode(frames, accept=FRONTEND.binder)
    assert info.value.reason == "heartbeat is not a gateway message (the scheduler's frontend socket)"
    with pytest.raises(ProtocolError, match="is not a scheduler message"):
        decode(frames, accept=BACKEND.connector)  # what the worker's end of the backend takes
    delta = encode(example(TokenDelta))
    assert type(decode(delta, accept=TOKENS.binder)[0]) is TokenDelta
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode([envelope("launch_missiles", {})], accept=TOKENS.binder)


def test_channel_declarations_are_checked() -> None:
    with pytest.raises(TypeError, match="derive it from FrontendMessage"):
        @FRONTEND.carries(to="scheduler")
        class Stray(BackendMessage):
            TAG: typing.ClassVar[str] = "stray-test"
    with pytest.raises(ValueError, match="no end 'worker'"):
        FRONTEND.carries(to="worker")
    assert "stray-test" not in FRONTEND.binder.inbound_tags


def test_package_exports_every_registered_message() -> None:
    assert {cls.__name__ for cls in MESSAGE_TYPES.values()} <= set(protocol.__all__)
    assert all(hasattr(protocol, name) for name in protocol.__all__)


def test_dtype_table_names_match_torch() -> None:
    for name, dtype in DTYPES.items():
        assert str(dtype) == f"torch.{name}"
