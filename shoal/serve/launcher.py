"""Start ``shoal serve`` as a child process on a free port and wait until it is healthy.

For end-to-end tests and the serving benchmark, like vLLM's ``RemoteOpenAIServer``:

    with ServerProcess(["--max-model-len", "512"]) as server:
        openai.OpenAI(base_url=server.base_url, api_key="...")
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m shoal.cli serve <args> --port <free port>``, stopped on exit.

    Args:
        args: flags for ``shoal <command>`` (not ``--port``).
        env: extra environment variables.
        startup_timeout_s: how long to wait for ``/health`` to answer 200.
        command: the subcommand (``serve``, ``gateway`` or ``proxy``).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0, host: str = "127.0.0.1",
                 command: str = "serve"):
        self.args = list(args)
        self.command = command  # the shoal subcommand: serve, gateway or proxy
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.host = host
        self.port = free_port(host)
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="shoal-serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, num_bytes: int = 4000) -> str:
        with open(self._log.name, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - num_bytes))
            return f.read().decode("utf-8", "replace")

    def start(self) -> ServerProcess:
        if self.proc is not None and self.proc.poll() is None:
            # a second launch would orphan the first (``with server.start():`` starts twice)
            raise RuntimeError("this ServerProcess is already running: use "
                               "`with ServerProcess(...) as server:` or start(), not both")
        cmd = [sys.executable, "-m", "shoal.cli", self.command, "--host", self.host,
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"shoal {self.command} exited with code {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"shoal {self.command} did not become healthy in "
                                   f"{self.startup_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def core_pid(self) -> int | None:
        """The engine-core child process's pid (for tests that kill it)."""
        if self.proc is None:
            return None
        for child in psutil.Process(self.proc.pid).children():
            if "shoal.frontend.core_main" in " ".join(child.cmdline()):
                return child.pid
        return None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("shoal serve did not stop in %.0f s; killing it", timeout_s)
            self.proc.kill()
            self.proc.wait(timeout_s)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)
