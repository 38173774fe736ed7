"""shoal's error hierarchy.

Every error a user can see derives from :class:`ShoalError`. Errors that concern
one worker carry its rank; errors that concern one request carry its id.
"""
from __future__ import annotations


class ShoalError(Exception):
    """Base class of every shoal error."""

    def __init__(self, message: str, *, rank: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.request_id = request_id


class ProtocolError(ShoalError):
    """A wire message was malformed, of a wrong version, or too large."""


class PlacementError(ShoalError):
    """Ray cannot place the bundles asked for (never on this cluster, or not in time)."""


class WorkerDiedError(ShoalError):
    """A worker process or actor died or stopped answering."""


class WorkerError(ShoalError):
    """A worker raised while running a command; the message holds its traceback."""


class EngineDeadError(ShoalError):
    """The engine cannot serve any more: its core process died beyond the restart budget
    (``--max-core-restarts``), or its workers failed beyond theirs
    (``--max-worker-restarts``). Requests in flight end with it."""


class EngineRestartingError(EngineDeadError):
    """The engine-core process died and a new one is starting (``--max-core-restarts``):
    a new request waited too long for it. Retry shortly (HTTP 503 with Retry-After)."""


class ModelNotAvailableError(ShoalError):
    """The model could not be found or fetched (for example: offline with an empty cache)."""


class RequestError(ShoalError, ValueError):
    """A request cannot be served as asked (for example: its prompt can never fit).

    A ValueError too, as vLLM's bad-input errors are, so ``except ValueError`` catches it.
    ``param`` names the offending request field where one is to blame, ``code`` is a
    machine-readable reason (OpenAI's, e.g. ``context_length_exceeded``).
    """

    def __init__(self, message: str, *, request_id: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message, request_id=request_id)
        self.param = param
        self.code = code


class OverloadedError(RequestError):
    """The engine's waiting queue is full: retry later (HTTP 503)."""
