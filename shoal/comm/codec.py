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
import types
import typing
from typing import Any, Sequence

import msgpack
import numpy as np

from shoal.comm.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, MsgType
from shoal.errors import ProtocolError

try:  # torch is optional for the codec: the API server process may not need it
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    torch = None  # type: ignore[assignment]

INLINE_THRESHOLD = 1024
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
_MAX_NDIM = 8


def _tensor_to_numpy(tensor: "torch.Tensor") -> tuple[np.ndarray, str]:
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
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [self.to_wire(getattr(obj, f.name)) for f in _fields(type(obj))]
        if isinstance(obj, np.ndarray):
            return self.array_ext(obj, obj.dtype.name, False)
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


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


@functools.lru_cache(maxsize=None)
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
        if dtype_name not in _WIRE_DTYPES:
            raise ProtocolError(f"array of unknown dtype {dtype_name!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise ProtocolError(f"malformed array shape {shape!r}")
        np_dtype = np.dtype(_WIRE_DTYPES[dtype_name])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if code == _EXT_INLINE:
            if not isinstance(ref, bytes):
                raise ProtocolError("inline array without bytes")
            raw: Any = ref
        elif code == _EXT_FRAME:
            if not isinstance(ref, int) or not 1 <= ref < len(self.frames):
                raise ProtocolError(f"array refers to frame {ref!r}; message has {len(self.frames)}")
            raw = _buffer(self.frames[ref])
        else:
            raise ProtocolError(f"unknown extension type {code}")
        if len(raw) != nbytes:
            raise ProtocolError(
                f"array {dtype_name}{shape} needs {nbytes} bytes, frame holds {len(raw)}"
            )
        array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        if not is_torch:
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


def _expect(ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ProtocolError(f"expected {what}, got {type(value).__name__}")


def from_wire(value: Any, hint: Any) -> Any:
    """Rebuild ``value`` as type ``hint``, checking it; raises ProtocolError on mismatch."""
    optional, hint = _is_optional(hint)
    if value is None:
        _expect(optional or hint is Any, f"a {hint}", value)
        return None
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        _expect(isinstance(value, list), f"a {hint.__name__} record", value)
        hints = _hints(hint)
        if len(value) != len(hints):
            raise ProtocolError(f"{hint.__name__} has {len(hints)} fields, got {len(value)}")
        return hint(*(from_wire(v, h) for v, (_, h) in zip(value, hints)))
    origin = typing.get_origin(hint)
    if origin is list:
        _expect(isinstance(value, list), "a list", value)
        (item,) = typing.get_args(hint)
        if item in (int, str, float, bool, Any):
            for x in value:
                from_wire(x, item)
            return value
        return [from_wire(x, item) for x in value]
    if origin is dict:
        _expect(isinstance(value, dict), "a map", value)
        key_t, val_t = typing.get_args(hint)
        return {from_wire(k, key_t): from_wire(v, val_t) for k, v in value.items()}
    if hint is np.ndarray:
        _expect(isinstance(value, np.ndarray), "an array", value)
        return value
    if hint is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a float", value)
        return float(value)
    if hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), "an int", value)
        return value
    if hint in (str, bool):
        _expect(isinstance(value, hint), hint.__name__, value)
        return value
    if torch is not None and hint is torch.Tensor:
        _expect(isinstance(value, torch.Tensor), "a tensor", value)
        return value
    raise ProtocolError(f"no wire decoding for type {hint!r}")


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
    try:
        cls = MESSAGE_TYPES[MsgType(msg_type)]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError(f"unknown message type {msg_type!r}") from None
    try:
        return from_wire(payload, cls)
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. a dataclass __post_init__ rejecting a value
        raise ProtocolError(f"invalid {cls.__name__}: {exc}") from None
