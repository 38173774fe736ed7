"""The wire's registry: protocol version and the type tag of every message.

Transport knows no message by name. Each layer that owns a boundary defines its
messages as dataclasses and registers them here with :func:`wire_message`:

- ``shoal.engine.control``: driver <-> worker control (bootstrap, typed calls, heartbeats);
- ``shoal.engine.plan``: the step protocol (StepPlan / StepResult);
- ``shoal.engine.core_io``: API server <-> engine core (requests in, token deltas out).

The codec (``shoal.comm.codec``) turns a registered message into msgpack frames
and back, checking every field against its type hint. Tags are unique across
the whole protocol; registering a second class under a taken tag is an error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

PROTOCOL_VERSION = 2

MESSAGE_TYPES: dict[int, type] = {}

T = TypeVar("T", bound=type)


def wire_message(tag: int) -> Callable[[T], T]:
    """Class decorator: register a dataclass as the wire message with type tag ``tag``."""

    def register(cls: T) -> T:
        taken = MESSAGE_TYPES.get(tag)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise TypeError(f"wire tag {tag} is taken by {taken.__name__}, not {cls.__name__}")
        cls.MSG_TYPE = tag
        MESSAGE_TYPES[tag] = cls
        return cls

    return register
