"""msgpack codec for wire messages, with zero-copy arrays.

A message becomes a list of ZeroMQ frames:

    frame 0:   msgpack [PROTOCOL_VERSION, msg_type, payload]
    frame 1..: raw bytes of large arrays, in order of appearance

The payload is the dataclass's field values as a msgpack array (nested
dataclasses likewise). numpy arrays and CPU torch tensors become msgpack
extension values: small ones carry their bytes inline, large ones (at least
``inline_threshold`` bytes) refer to a separate frame that ZeroMQ sends without
copying. Decoding rebuilds the dataclasses from their type hints and checks
every value; anything malformed raises ProtocolError. No pickle anywhere.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from shoal.comm.protocol import MESSAGE_TYPES, PROTOCOL_VERSION
from shoal.errors import ProtocolError


def _torch() -> Any:
    """torch if this process has loaded it, else None.

    The codec never loads torch itself: driver-side processes (the engine core, the
    API server) stay torch-free. A tensor can only be encoded where torch is loaded;
    an array sent as a tensor decodes to a tensor where torch is loaded, else to the
    numpy array it travels as.
    """
    return sys.modules.get("torch")

# Arrays below this many bytes travel inside frame 0: a 256-request plan's columns are
# a few KB each, and a ZeroMQ frame of its own costs more than copying them does.
INLINE_THRESHOLD = 16 << 10
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

_EXT_INLINE = 1  # [dtype, shape, is_torch, bytes]
_EXT_FRAME = 2  # [dtype, shape, is_torch, frame_index]

# dtypes allowed on the wire; bfloat16 has no numpy type and travels as uint16 bits
_WIRE_DTYPES = {
    "bool": np.bool_,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": np.uint16,
}
_NP_DTYPES = {name: np.dtype(kind) for name, kind in _WIRE_DTYPES.items()}
_DTYPE_NAMES = {np.dtype(kind): name for name, kind in _WIRE_DTYPES.items() if name != "bfloat16"}
_MAX_NDIM = 8


def _tensor_to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    torch = _torch()
    if tensor.device.type != "cpu":
        raise TypeError(f"only CPU tensors can be sent, got one on {tensor.device}")
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy(), "bfloat16"
    return tensor.numpy(), str(tensor.dtype).removeprefix("torch.")


class _Encoder:
    """One encode call: collects out-of-band frames while packing."""

    def __init__(self, inline_threshold: int):
        self.inline_threshold = inline_threshold
        self.frames: list[Any] = []

    def array_ext(self, array: np.ndarray, dtype_name: str, is_torch: bool) -> msgpack.ExtType:
        if dtype_name not in _WIRE_DTYPES:
            raise TypeError(f"dtype {dtype_name} cannot travel on the wire")
        array = np.ascontiguousarray(array)
        shape = list(array.shape)
        if array.nbytes == 0 or array.nbytes < self.inline_threshold:
            body = [dtype_name, shape, is_torch, array.tobytes()]
            return msgpack.ExtType(_EXT_INLINE, msgpack.packb(body))
        self.frames.append(memoryview(array.reshape(-1).view(np.uint8)))
        body = [dtype_name, shape, is_torch, len(self.frames)]
        return msgpack.ExtType(_EXT_FRAME, msgpack.packb(body))

    def to_wire(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _PLAIN:
            return obj
        if kind is list:
            if set(map(type, obj)) <= _PLAIN_SET:
                return obj
            return [self.to_wire(x) for x in obj]
        if kind is np.ndarray:
            dtype = obj.dtype
            return self.array_ext(obj, _DTYPE_NAMES.get(dtype) or dtype.name, False)
        names = _field_names(kind)
        if names is not None:
            return [self.to_wire(getattr(obj, n)) for n in names]
        if isinstance(obj, np.ndarray):
            return self.array_ext(obj, obj.dtype.name, False)
        torch = _torch()
        if torch is not None and isinstance(obj, torch.Tensor):
            array, dtype_name = _tensor_to_numpy(obj)
            return self.array_ext(array, dtype_name, True)
        if isinstance(obj, (list, tuple)):
            return [self.to_wire(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self.to_wire(v) for k, v in obj.items()}
        if isinstance(obj, np.generic):
            return obj.item()
        return obj


_PLAIN = (int, float, str, bool, bytes, type(None))
_PLAIN_SET = frozenset(_PLAIN)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """Field names of a dataclass type in order; None for anything else."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return None


@functools.cache
def _hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def encode(msg: Any, inline_threshold: int = INLINE_THRESHOLD) -> list[Any]:
    """Encode a registered message into ZeroMQ frames (frame 0 is the msgpack header)."""
    msg_type = getattr(type(msg), "MSG_TYPE", None)
    if msg_type is None or MESSAGE_TYPES.get(msg_type) is not type(msg):
        raise TypeError(f"{type(msg).__name__} is not a registered wire message")
    encoder = _Encoder(inline_threshold)
    payload = encoder.to_wire(msg)
    header = msgpack.packb([PROTOCOL_VERSION, int(msg_type), payload], use_bin_type=True)
    return [header, *encoder.frames]


def _buffer(frame: Any) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


class _Decoder:
    def __init__(self, frames: Sequence[Any]):
        self.frames = frames

    def ext_hook(self, code: int, data: bytes) -> Any:
        try:
            dtype_name, shape, is_torch, ref = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise ProtocolError(f"malformed array header: {exc}") from None
        np_dtype = _NP_DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if np_dtype is None:
            raise ProtocolError(f"array of unknown dtype {dtype_name!r}")
        if (
            type(shape) is not list
            or len(shape) > _MAX_NDIM
            or not all(type(s) is int and s >= 0 for s in shape)
        ):
            raise ProtocolError(f"malformed array shape {shape!r}")
        nbytes = math.prod(shape) * np_dtype.itemsize
        if code == _EXT_INLINE:
            if type(ref) is not bytes:
                raise ProtocolError("inline array without bytes")
            raw: Any = ref
        elif code == _EXT_FRAME:
            if type(ref) is not int or not 1 <= ref < len(self.frames):
                raise ProtocolError(f"array refers to frame {ref!r}; message has {len(self.frames)}")
            raw = _buffer(self.frames[ref])
        else:
            raise ProtocolError(f"unknown extension type {code}")
        if len(raw) != nbytes:
            raise ProtocolError(
                f"array {dtype_name}{shape} needs {nbytes} bytes, frame holds {len(raw)}"
            )
        array = np.frombuffer(raw, dtype=np_dtype)
        if len(shape) != 1:
            array = array.reshape(shape)
        if not is_torch:
            return array
        torch = _torch()
        if torch is None:
            return array
        tensor = torch.from_numpy(array.copy())
        return tensor.view(torch.bfloat16) if dtype_name == "bfloat16" else tensor


def _is_optional(hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def _fail(what: str, value: Any) -> None:
    raise ProtocolError(f"expected {what}, got {type(value).__name__}")


def _scalar(kind: type) -> Any:
    if kind is float:
        def check(v):
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            _fail("a float", v)
    elif kind is int:
        def check(v):
            if type(v) is not int:
                _fail("an int", v)
            return v
    else:
        def check(v):
            if type(v) is not kind:
                _fail(kind.__name__, v)
            return v
    return check


@functools.cache
def _decoder(hint: Any) -> Any:
    """A function checking and rebuilding one wire value of type ``hint`` (built once per type)."""
    optional, hint = _is_optional(hint)
    inner = _decoder_required(hint)
    if not optional:
        def required(v):
            if v is None and hint is not Any:
                _fail(f"a {getattr(hint, '__name__', hint)}", v)
            return inner(v)
        return required
    return lambda v: None if v is None else inner(v)


def _decoder_required(hint: Any) -> Any:
    if hint is Any:
        return lambda v: v
    if dataclasses.is_dataclass(hint):
        names_hints = _hints(hint)
        decoders = [_decoder(h) for _, h in names_hints]
        count = len(decoders)

        def record(v):
            if type(v) is not list:
                _fail(f"a {hint.__name__} record", v)
            if len(v) != count:
                raise ProtocolError(f"{hint.__name__} has {count} fields, got {len(v)}")
            return hint(*[d(x) for d, x in zip(decoders, v)])
        return record
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if item in (int, float, str, bool):
            check_item = _scalar(item)
            allowed = {float, int} if item is float else {item}

            def scalar_list(v):
                if type(v) is not list:
                    _fail("a list", v)
                kinds = set(map(type, v))  # one pass in C, not a check per element
                if not kinds <= allowed:
                    bad = next(x for x in v if type(x) not in allowed)
                    _fail(f"a list of {item.__name__}", bad)
                if item is float and int in kinds:
                    return [check_item(x) for x in v]
                return v
            return scalar_list
        item_decoder = _decoder(item)

        def any_list(v):
            if type(v) is not list:
                _fail("a list", v)
            return [item_decoder(x) for x in v]
        return any_list
    if origin is dict:
        key_decoder, value_decoder = (_decoder(a) for a in typing.get_args(hint))

        def mapping(v):
            if type(v) is not dict:
                _fail("a map", v)
            return {key_decoder(k): value_decoder(x) for k, x in v.items()}
        return mapping
    if hint is np.ndarray:
        def array(v):
            if not isinstance(v, np.ndarray):
                _fail("an array", v)
            return v
        return array
    if hint in (int, float, str, bool, bytes):
        return _scalar(hint)
    torch = _torch()
    if torch is not None and hint is torch.Tensor:
        def tensor(v):
            if not isinstance(v, torch.Tensor):
                _fail("a tensor", v)
            return v
        return tensor
    raise TypeError(f"no wire decoding for type {hint!r}")


def pack_value(obj: Any) -> bytes:
    """One typed value (a dataclass of plain fields) as msgpack bytes, to nest in a message."""
    encoder = _Encoder(inline_threshold=1 << 62)  # arrays inline: nested bytes have no frames
    return msgpack.packb(encoder.to_wire(obj), use_bin_type=True)


def unpack_value(data: bytes, hint: Any) -> Any:
    """The inverse of :func:`pack_value`, checked against ``hint``; ProtocolError if malformed."""
    decoder = _Decoder([])
    try:
        value = msgpack.unpackb(data, raw=False, ext_hook=decoder.ext_hook, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable value: {type(exc).__name__}: {exc}") from None
    try:
        return from_wire(value, hint)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"invalid {getattr(hint, '__name__', hint)}: {exc}") from None


def from_wire(value: Any, hint: Any) -> Any:
    """Rebuild ``value`` as type ``hint``, checking it; raises ProtocolError on mismatch."""
    return _decoder(hint)(value)


def decode(frames: Sequence[Any], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Decode ZeroMQ frames into a message; raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    total = sum(len(_buffer(f)) for f in frames)
    if total > max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_message_bytes}")
    decoder = _Decoder(frames)
    try:
        header = msgpack.unpackb(
            _buffer(frames[0]),
            raw=False,
            ext_hook=decoder.ext_hook,
            strict_map_key=False,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, list) or len(header) != 3:
        raise ProtocolError("message header must be [version, type, payload]")
    version, msg_type, payload = header
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(msg_type) if type(msg_type) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    try:
        return from_wire(payload, cls)
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. a dataclass __post_init__ rejecting a value
        raise ProtocolError(f"invalid {cls.__name__}: {exc}") from None
