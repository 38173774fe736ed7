"""Connection hygiene of the HTTP server: slow clients, connection floods, saturation.

- ``guarded_protocol(...)``: uvicorn's httptools protocol with a header-read
  timeout (a connection that has not sent complete headers within
  ``header_timeout_s`` is closed: slowloris), a cap on requests per keep-alive
  connection (the last answer says ``connection: close``), and a connection cap
  that, when reached, closes the connection that has waited longest for its
  headers instead of refusing newcomers, so a health probe always gets in.
- ``ConcurrencyGuard``: at most ``limit`` ``/v1`` requests in flight; beyond it
  503 with ``Retry-After``. ``/health``, ``/metrics`` and ``/version`` are never
  counted, so probes and scrapers are answered while the API is saturated.
  (uvicorn's own ``limit_concurrency`` counts open connections, so half-open
  sockets made it answer 503 to ``/health`` too; it is not used.)
- ``GracefulServer``: on SIGTERM/SIGINT it stops admissions (new ``/v1``
  requests get 503, the listening socket closes), lets running requests and
  streams finish for up to ``shutdown_timeout_s``, then ends every one that is
  left through the engine client (a stream gets an error event, then
  ``[DONE]``), so nothing is cut mid-event and no task is cancelled.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def guarded_protocol(header_timeout_s: float = 10.0, max_connections: int = 4096,
                     max_requests_per_connection: int = 1000) -> type[HttpToolsProtocol]:
    """A uvicorn ``http=`` protocol class with these limits."""
    if header_timeout_s <= 0 or max_connections <= 0 or max_requests_per_connection <= 0:
        raise ValueError("header timeout, connection cap and requests per connection "
                         "must be positive")

    class GuardedHttpProtocol(HttpToolsProtocol):
        awaiting: dict[GuardedHttpProtocol, None] = {}  # waiting for headers, oldest first

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._requests = 0
            self._header_timer: asyncio.TimerHandle | None = None
            self._await_headers()
            if len(self.connections) > max_connections:
                oldest = next((p for p in self.awaiting if p is not self), None)
                if oldest is not None:
                    logger.warning("%d connections open: closing the one waiting longest "
                                   "for its headers", len(self.connections))
                    oldest._drop()

        def _await_headers(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._drop)
                self.awaiting[self] = None

        def _headers_done(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self.awaiting.pop(self, None)

        def _drop(self) -> None:
            self._headers_done()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()  # the next request on a keep-alive connection

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()
            self._requests += 1
            if self._requests >= max_requests_per_connection and self.cycle is not None:
                self.cycle.keep_alive = False

        def connection_lost(self, exc) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return GuardedHttpProtocol


@dataclass
class ServerLifecycle:
    """Shared by the middleware and the server: set when shutdown begins."""

    draining: bool = False


class ConcurrencyGuard:
    """Pure ASGI middleware: at most ``limit`` ``/v1`` requests in flight, else 503."""

    def __init__(self, app: ASGIApp, limit: int, lifecycle: ServerLifecycle | None = None):
        if limit <= 0:
            raise ValueError(f"the concurrent request limit must be positive, got {limit}")
        self.app = app
        self.limit = limit
        self.lifecycle = lifecycle or ServerLifecycle()
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await _unavailable(send, "the server is shutting down", "shutting_down")
            return
        if self.active >= self.limit:
            await _unavailable(send, f"the server is handling {self.limit} requests, its "
                               "limit (--max-concurrent-requests); retry shortly",
                               "too_many_requests")
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def _unavailable(send: Send, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "server_overloaded",
                                 "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase: admissions stop, running work gets a deadline."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle,
                 end_all: Callable[[str], None], shutdown_timeout_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.end_all = end_all
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets=None) -> None:
        self.lifecycle.draining = True
        logger.warning("shutting down: no new requests; running ones have %.0f s to finish",
                       self.shutdown_timeout_s)
        deadline = asyncio.get_running_loop().call_later(
            self.shutdown_timeout_s, self.end_all,
            f"the server is shutting down (--shutdown-timeout {self.shutdown_timeout_s:g} s)")
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
