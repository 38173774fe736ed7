"""The API server's side of the engine: a child process behind ZeroMQ, driven from asyncio.

``AsyncEngineClient`` starts ``python -m shoal.frontend.core_main`` as a fresh
interpreter, binds the two ipc:// sockets it connects to, and turns its
CoreOutputs into text with an ``OutputProcessor`` on the event loop. Each user
request gets a ``RequestStream`` (``shoal.serve.request_stream``) that its HTTP handler reads. Admission is
awaited: ``generate`` returns only once the core accepted the request, so a
rejection (prompt can never fit, queue full) becomes an HTTP error before any
byte of a stream is sent.

When the core process dies (it exits, or reports ``EngineFailure``), the client
starts a new one, the way the core replaces a dead worker group: fresh sockets in
a fresh directory, the same ``EngineConfig``. Meanwhile ``healthy`` is False
(``/health`` answers 503). Once the new core is ready, every unfinished request
is re-submitted as its original ``AddRequest`` plus the tokens each child has
delivered so far (``output_token_ids``), so the new core recomputes prompt plus
outputs and continues after them. The ``OutputProcessor`` keeps its state
throughout, so no text is emitted twice and usage stays right; what the old core
sent but this side never read is simply generated again. Greedy and seeded
outputs are unchanged: a seeded row's sample depends only on (seed, number of
outputs so far). Unseeded random sampling continues from a new generator.
Aborts during the restart are honoured (the request is not re-submitted). New
requests wait for the new core up to ``RESTART_ADMISSION_WAIT_S``, then get
``EngineRestartingError`` (503 with Retry-After). Restarts are budgeted
(``--max-core-restarts`` within ``--core-restart-window``); beyond the budget, or
when the first core never became ready, every request fails with
``EngineDeadError`` and ``healthy`` stays False.

``fatal_reason`` is the verdict a supervisor outside the process needs (Ray
Serve's ``check_health``): None while the engine serves or replaces its core
within budget, a reason once it is dead, or once it has gone silent for longer
than its own recovery could take (``stall_timeout_s``: a step timeout plus a
worker group's start timeout, plus a margin): requests in flight and no message
from a live core, or a core replacement that never became ready.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import time

import zmq
import zmq.asyncio

from shoal.comm.codec import decode, encode
from shoal.comm.socket_dirs import make_socket_dir
from shoal.config import EngineConfig
from shoal.engine.control import Shutdown
from shoal.engine.core_io import (
    AbortRequests,
    AddRequest,
    CoreOutputs,
    EngineFailure,
    EngineReady,
    PrefixCacheReset,
    ResetPrefixCache,
)
from shoal.engine.recovery import RestartPolicy
from shoal.engine.sampling_params import PoolingParams, SamplingParams
from shoal.errors import EngineDeadError, EngineRestartingError, ProtocolError
from shoal.frontend.input_processor import InputProcessor
from shoal.frontend.output_processor import OutputProcessor
from shoal.frontend.outputs import RequestOutput
from shoal.serve.metrics import ServerMetrics
from shoal.serve.request_stream import (
    RequestRejectedError,
    RequestStream,
    _Tracked,
    resumed_request,
)

logger = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 256 << 20
WATCH_INTERVAL_S = 0.2
SEND_TIMEOUT_MS = 2000  # a send blocks only with no core connected (dead): then it is dropped
EXIT_GRACE_S = 5.0  # a core that reported EngineFailure gets this long to exit by itself
RESTART_ADMISSION_WAIT_S = 30.0  # new requests wait this long for a restarting core, then 503
STALL_MARGIN_S = 30.0  # beyond the core's own step timeout + worker start timeout


class AsyncEngineClient:
    """Starts the engine-core process and serves requests to it from the event loop.

    Start-up is ``start()`` (spawns the core and returns), ``set_tokenizer()``
    (loaded meanwhile, while the core loads the model), then ``wait_ready()``.

    Args:
        config: the engine configuration the core runs with.
        model_path: the local checkpoint directory.
        max_model_len: the context length served.
        metrics: where request and engine metrics go.
    """

    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int,
                 metrics: ServerMetrics, vocab_size: int):
        self.config = config
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.vocab_size = vocab_size
        self.inputs = InputProcessor(None, vocab_size, max_model_len, set())
        self.processor = OutputProcessor(None)
        self.info: EngineReady | None = None
        self.proc: subprocess.Popen | None = None
        self.dead_reason: str | None = None
        self.restart_reason: str | None = None  # set while a dead core is being replaced
        self.num_core_restarts = 0
        self._restarts = RestartPolicy(config.fault.max_core_restarts,
                                       config.fault.core_restart_window_s,
                                       what="engine-core restarts",
                                       flags="--max-core-restarts, --core-restart-window")
        self._restart_task: asyncio.Task | None = None
        self._restart_started = 0.0
        self._last_core_message = time.monotonic()  # or the first request after a quiet spell
        # silence beyond this, with work to do, means the core's own recovery failed too
        self.stall_timeout_s = (config.fault.step_timeout_s + config.executor.start_timeout_s
                                + STALL_MARGIN_S)
        self._serving = asyncio.Event()  # clear only while a core restarts
        self._serving.set()
        self._ids = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._admissions: dict[str, asyncio.Future] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._child_parent: dict[int, str] = {}
        self._tasks: list[asyncio.Task] = []
        self._ready: asyncio.Future | None = None
        self._resets: list[asyncio.Future] = []  # prefix-cache resets awaiting the core
        self.last_stats = None  # the core's latest CoreStats
        self._tmpdir: str | None = None
        self._sync_ctx: zmq.Context | None = None
        self._async_ctx: zmq.asyncio.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer, eos_ids: set[int]) -> None:
        """The tokenizer (None: token-id prompts only) and EOS ids; before any request."""
        self.processor = OutputProcessor(tokenizer)
        self.inputs = InputProcessor(tokenizer, self.vocab_size, self.max_model_len, eos_ids)

    async def start(self) -> None:
        """Start the core process (it connects to sockets bound here); see ``wait_ready``."""
        self._sync_ctx = zmq.Context()
        self._async_ctx = zmq.asyncio.Context()
        self._spawn()

    def _spawn(self) -> None:
        """Start a core process on new sockets in a new directory (one incarnation)."""
        loop = asyncio.get_running_loop()
        self._tmpdir = make_socket_dir("api")  # stale ones of dead servers are removed
        self._push = self._sync_ctx.socket(zmq.PUSH)  # no high-water mark: blocks only
        self._push.setsockopt(zmq.SNDHWM, 0)          # while no core is connected
        self._push.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self._push.setsockopt(zmq.LINGER, 0)
        self._pull = self._async_ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        input_address = f"ipc://{self._tmpdir}/in"
        output_address = f"ipc://{self._tmpdir}/out"
        self._push.bind(input_address)
        self._pull.bind(output_address)
        cmd = [
            sys.executable, "-m", "shoal.frontend.core_main",
            "--input-address", input_address,
            "--output-address", output_address,
            "--config", self.config.to_json(),
            "--model-path", self.model_path,
            "--max-model-len", str(self.max_model_len),
            "--parent-pid", str(os.getpid()),
        ]
        self.proc = proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        logger.info("started the engine core process (pid %d)", proc.pid)
        self._ready = ready = loop.create_future()
        self._tasks = [loop.create_task(self._output_loop(self._pull, proc, ready)),
                       loop.create_task(self._watch(proc))]

    async def _end_core(self) -> None:
        """Stop the current incarnation: its tasks, its process, its sockets, its directory."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                await asyncio.to_thread(proc.wait, EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        self._push = self._pull = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def wait_ready(self) -> EngineReady:
        """Wait until the core has loaded the model (raises EngineDeadError if it died)."""
        assert self._ready is not None, "start() first"
        self.info = await self._ready
        self.metrics.set_healthy(True)
        logger.info("engine core ready: %d KV pages of %d tokens",
                    self.info.num_pages, self.info.page_size)
        return self.info

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the core to exit, then make sure it did; release the sockets."""
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        for task in self._tasks:
            task.cancel()
        proc = self.proc
        if proc is not None and proc.poll() is None and self._push is not None:
            try:
                self._push.send_multipart(encode(Shutdown("API server stopping")), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not exit in %.0f s; killing it", timeout_s)
                proc.kill()
                await asyncio.to_thread(proc.wait, timeout_s)
        self._mark_dead("the server is shutting down", log=False, kind="shutdown")
        for ctx in (self._sync_ctx, self._async_ctx):
            if ctx is not None:
                ctx.destroy(linger=0)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def fail_all(self, reason: str) -> None:
        """End every request in flight with ``reason`` (streams: an error event, [DONE])."""
        self._mark_dead(reason, log=False, kind="shutdown")

    @property
    def healthy(self) -> bool:
        return self.dead_reason is None and self.restart_reason is None and self.info is not None

    @property
    def unhealthy_reason(self) -> str | None:
        """Why ``healthy`` is False (None while it is True or before the first start)."""
        if self.dead_reason is not None:
            return self.dead_reason
        if self.restart_reason is not None:
            return f"the engine core is restarting: {self.restart_reason}"
        return None

    @property
    def fatal_reason(self) -> str | None:
        """Why this engine will not serve again without outside help (module docstring);
        None while it can, including while its core is replaced within budget."""
        if self.dead_reason is not None:
            return self.dead_reason
        now = time.monotonic()
        if self._restart_task is not None:
            waited = now - self._restart_started
            if waited > self.stall_timeout_s:
                return (f"the engine core has been restarting for {waited:.0f} s "
                        f"(> {self.stall_timeout_s:.0f} s): {self.restart_reason}")
            return None
        silent = now - self._last_core_message
        if self.info is not None and self._tracked and silent > self.stall_timeout_s:
            return (f"the engine core is stalled: {len(self._tracked)} requests in flight and "
                    f"no output for {silent:.0f} s (> {self.stall_timeout_s:.0f} s: step "
                    "timeout + worker start timeout + margin)")
        return None

    def _mark_dead(self, reason: str, log: bool = True, kind: str = "engine_dead") -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self.restart_reason = None
        self._serving.set()  # wakes requests waiting for a restart; they see dead_reason
        task, self._restart_task = self._restart_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.metrics.set_healthy(False)
        # gauges would otherwise freeze at their last values; failed requests are counted
        self.metrics.engine_down(len(self._streams), kind)
        if log:
            logger.error("engine core is dead: %s", reason)
        error = EngineDeadError(reason)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for future in [*self._admissions.values(), *self._resets]:
            if not future.done():
                future.set_exception(error)
        self._admissions.clear()
        self._resets.clear()
        for request_id, stream in list(self._streams.items()):
            stream.fail(error)
            self.processor.abort(request_id)
        self._streams.clear()
        self._tracked.clear()
        self._child_parent.clear()

    async def _watch(self, proc: subprocess.Popen) -> None:
        while True:
            code = proc.poll()
            if code is not None:
                self._core_failed(proc, f"the engine core process exited with code {code}")
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    # -- restarts ------------------------------------------------------------------------------

    def _core_failed(self, proc: subprocess.Popen, reason: str) -> None:
        """The core ``proc`` died or failed: restart it within budget, else fail everything."""
        if proc is not self.proc or self.dead_reason is not None:
            return  # an old incarnation, or nothing left to save
        if self._ready is not None and not self._ready.done():
            if self._restart_task is None:  # the first start failed: that is final
                self._mark_dead(reason)
            else:  # a replacement failed to start: _restart decides
                self._ready.set_exception(EngineDeadError(reason))
            return
        if self._restart_task is not None:
            return
        if not self._allow_restart(reason):
            return
        logger.error("%s; starting a new engine core for %d requests in flight",
                     reason, len(self._tracked))
        self.restart_reason = reason
        self._restart_started = time.monotonic()
        for future in self._resets:  # the core that would have answered is gone
            if not future.done():
                future.set_exception(EngineRestartingError(
                    f"the engine core is restarting ({reason}); nothing to reset"))
        self._resets.clear()
        self._serving.clear()
        self.metrics.set_healthy(False)
        self._restart_task = asyncio.get_running_loop().create_task(self._restart(reason))

    def _allow_restart(self, reason: str) -> bool:
        """True if the budget allows one more restart; else the engine is marked dead."""
        if self._restarts.allow():
            return True
        budget = ("core restarts are off (--max-core-restarts 0)"
                  if self._restarts.max_restarts == 0
                  else f"the restart budget is spent: {self._restarts.describe()}")
        self._mark_dead(f"{reason}; {budget}")
        return False

    async def _restart(self, reason: str) -> None:
        """Replace the dead core, then re-submit every unfinished request to the new one."""
        started = time.monotonic()
        while True:
            await self._end_core()
            self._spawn()
            try:
                info = await self._ready
                break
            except EngineDeadError as exc:  # the replacement died while starting
                reason = f"{reason}; then a new engine core failed to start: {exc}"
                if not self._allow_restart(reason):
                    return
                logger.error("%s; trying again", reason)
        self.info = info
        self._restart_task = None
        self.restart_reason = None
        self._last_core_message = time.monotonic()
        resubmitted = self._resubmit()  # no await since the ready check: nothing interleaves
        self._serving.set()
        self.num_core_restarts += 1
        elapsed = time.monotonic() - started
        self.metrics.core_restarted(elapsed, resubmitted)
        self.metrics.set_healthy(True)
        logger.warning("engine core replaced in %.1f s (pid %d); %d requests re-submitted (%s)",
                       elapsed, info.pid, resubmitted, self._restarts.describe())

    def _resubmit(self) -> int:
        """Send every request in flight to the new core, in arrival order; returns the count."""
        count = 0
        for request_id, tracked in self._tracked.items():
            if request_id in self._admissions:  # never admitted: send it as it was
                self._send(tracked.core_request)
            else:
                generated = self.processor.unfinished_token_ids(request_id)
                if not generated:
                    continue
                self._send(resumed_request(tracked.core_request, generated))
            count += 1
        return count

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, notify: asyncio.Event | None = None
                       ) -> RequestStream:
        """Submit a request and wait until the core admitted it.

        Raises:
            EngineDeadError: the core process is gone.
            RequestRejectedError: the core refused it (kind "invalid" or "overloaded").
        """
        if not self._serving.is_set():
            try:
                await asyncio.wait_for(self._serving.wait(), RESTART_ADMISSION_WAIT_S)
            except asyncio.TimeoutError:
                raise EngineRestartingError(
                    f"the engine core is restarting ({self.restart_reason}); retry shortly",
                    request_id=request_id) from None
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        arrival = time.monotonic()
        child_ids = [next(self._ids) for _ in range(params.n)]
        msg = self.inputs.process_tokens(request_id, prompt, prompt_token_ids, params, child_ids,
                                         arrival).core_request
        return await self._admit(msg, prompt, prompt_token_ids, params, notify)

    async def embed(self, request_id: str, prompt_token_ids: list[int], params: PoolingParams,
                    notify: asyncio.Event | None = None) -> RequestStream:
        """Submit an embedding request (``--pooling`` unless ``params`` says otherwise).

        Its finished output carries ``outputs[0].embedding``; raises as :meth:`generate`.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        msg = self.inputs.process_pooling(request_id, prompt_token_ids, params,
                                          self.config.model.pooling, next(self._ids),
                                          "input").core_request
        return await self._admit(msg, None, prompt_token_ids, SamplingParams(), notify)

    async def _admit(self, msg: AddRequest, prompt: str | None, prompt_token_ids: list[int],
                     params: SamplingParams, notify: asyncio.Event | None) -> RequestStream:
        """Track a checked request, send it to the core, and wait until it is admitted."""
        request_id, child_ids, arrival = msg.request_id, msg.req_ids, msg.arrival_time
        if not self._tracked:  # the core had nothing to say while idle: silence counts from now
            self._last_core_message = time.monotonic()
        self.processor.add_request(request_id, prompt, prompt_token_ids, params, child_ids, arrival)
        stream = RequestStream(request_id, len(child_ids), notify or asyncio.Event())
        self._streams[request_id] = stream
        self._tracked[request_id] = _Tracked(arrival, child_ids, msg)
        for child in child_ids:
            self._child_parent[child] = request_id
        admitted = asyncio.get_running_loop().create_future()
        self._admissions[request_id] = admitted
        self._send(msg)
        try:
            await admitted
        except RequestRejectedError:
            self._forget(request_id)
            raise
        except BaseException:  # cancelled (the client left) or the engine died
            self.abort(request_id)
            raise
        self.metrics.prompt_tokens(len(prompt_token_ids))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (the client went away); its pages are freed in the core.

        During a core restart it is only forgotten here, so it is not re-submitted.
        """
        future = self._admissions.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()
        child_ids = self._forget(request_id)
        if child_ids and self.dead_reason is None:
            self.metrics.request_finished("abort")
            self._send(AbortRequests(child_ids, "abort"))

    def _forget(self, request_id: str) -> list[int]:
        self._streams.pop(request_id, None)
        tracked = self._tracked.pop(request_id, None)
        for child in tracked.child_ids if tracked is not None else ():
            self._child_parent.pop(child, None)
        return self.processor.abort(request_id)

    def _send(self, msg) -> None:
        """Send to the live core; dropped while it is being replaced (or found dead)."""
        if self._restart_task is not None or self._push is None:
            return
        try:
            self._push.send_multipart(encode(msg), copy=False)
        except zmq.Again:  # no core connected: it died; the watcher restarts or fails it
            logger.warning("dropped a %s: the engine core is not connected", type(msg).__name__)

    async def reset_prefix_cache(self, timeout_s: float = 30.0) -> PrefixCacheReset:
        """Ask the core to forget its cached prefixes; its answer (``ok`` False: not now).
        EngineDeadError when there is no core to ask (dead, or being replaced)."""
        if self.dead_reason is not None or self._restart_task is not None or self._push is None:
            raise EngineDeadError(self.unhealthy_reason or "the engine core is not running")
        future = asyncio.get_running_loop().create_future()
        self._resets.append(future)
        self._send(ResetPrefixCache())
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"the engine core did not answer a prefix-cache reset "
                                  f"within {timeout_s:.0f} s") from None
        finally:
            if future in self._resets:
                self._resets.remove(future)

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- outputs -------------------------------------------------------------------------------

    async def _output_loop(self, pull: zmq.asyncio.Socket, proc: subprocess.Popen,
                           ready: asyncio.Future) -> None:
        while True:
            frames = await pull.recv_multipart(copy=False)
            self._last_core_message = time.monotonic()
            try:
                msg = decode(frames, MAX_OUTPUT_BYTES)
            except ProtocolError as exc:
                logger.error("dropped a malformed message from the engine core: %s", exc)
                continue
            try:
                if isinstance(msg, CoreOutputs):
                    self._handle(msg)
                elif isinstance(msg, PrefixCacheReset):
                    if self._resets:  # answers come in the order the resets were sent
                        future = self._resets.pop(0)
                        if not future.done():
                            future.set_result(msg)
                elif isinstance(msg, EngineReady):
                    if not ready.done():
                        ready.set_result(msg)
                elif isinstance(msg, EngineFailure):
                    reason = f"the engine core failed: {msg.error}"
                    if not msg.restartable and proc is self.proc:
                        self._mark_dead(reason)  # its own budget is spent: a new core would
                    else:                        # only reset it
                        self._core_failed(proc, reason)
                else:
                    logger.warning("unexpected %s from the engine core", type(msg).__name__)
            except Exception:  # a bug here must not stop every other request's outputs
                logger.exception("error while handling engine outputs")

    def _handle(self, msg: CoreOutputs) -> None:
        for request_id in msg.accepted:
            future = self._admissions.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        for rejection in msg.rejected:
            error = RequestRejectedError(rejection.kind, rejection.message, rejection.request_id)
            future = self._admissions.pop(rejection.request_id, None)
            if future is not None and not future.done():
                future.set_exception(error)
            elif rejection.request_id in self._streams:  # a re-submitted request refused
                self._streams[rejection.request_id].fail(error)
                self._forget(rejection.request_id)
        for child in msg.scheduled_req_ids:
            tracked = self._tracked.get(self._child_parent.get(child, ""))
            if tracked is not None and not tracked.queued_observed:
                tracked.queued_observed = True
                self.metrics.queue_time(msg.scheduled_time - tracked.arrival)
        if msg.deltas:
            self._apply(msg)
        self.last_stats = msg.stats
        self.metrics.engine_stats(msg.stats)

    def _apply(self, msg: CoreOutputs) -> None:
        now = time.monotonic()
        self.metrics.generation_tokens(sum(len(d.new_token_ids) for d in msg.deltas))
        processed = self.processor.process(msg.deltas)
        if processed.stopped:
            self._send(AbortRequests(processed.stopped, "stop"))
        for output in processed.outputs:
            self._deliver(output, now)

    def _deliver(self, output: RequestOutput, now: float) -> None:
        request_id = output.request_id
        tracked = self._tracked.get(request_id)
        new_tokens = max((len(ids) for ids in output.delta_token_ids), default=0)
        if tracked is not None and new_tokens:
            if tracked.last_token is None:
                self.metrics.first_token(now - tracked.arrival)
                new_tokens -= 1
            gap = (now - tracked.last_token) / max(1, new_tokens) if tracked.last_token else 0.0
            for _ in range(new_tokens):  # a multi-token step: its time spread over its tokens
                self.metrics.inter_token(gap)
            tracked.last_token = now
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(output)
        if output.finished:
            self.metrics.request_done(output)
            for completion in output.outputs:
                self.metrics.request_finished(completion.finish_reason or "abort")
            self._streams.pop(request_id, None)
            self._tracked.pop(request_id, None)
            for child in tracked.child_ids if tracked is not None else ():
                self._child_parent.pop(child, None)
