"""``python -m shoal.frontend.core_main``: the engine-core process behind the HTTP server.

The engine layer holds the loop (``shoal.engine.core_proc``) but may not build
executors; this entry point, above both, gives it the executor the config names.
"""
from __future__ import annotations

import logging
import os
import sys

from shoal.engine.core_proc import serve_core
from shoal.executor.supervisor import create_supervised_executor


def main(argv: list[str] | None = None) -> int:
    return serve_core(argv, create_supervised_executor)


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the slow interpreter teardown of torch's and ZeroMQ's threads
