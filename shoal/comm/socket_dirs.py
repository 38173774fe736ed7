"""Private directories for ipc:// sockets that never outlive their process for long.

Each directory is ``$TMPDIR/shoal-<kind>-<pid>-<random>``, mode 0700 (only this
user can reach its sockets). A clean exit removes it; after ``kill -9`` nothing
can, so every new one first removes this user's directories whose pid is dead.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^shoal-[a-z]+-(\d+)-[A-Za-z0-9_]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_socket_dirs(root: str | None = None) -> list[str]:
    """Remove this user's socket directories left by dead processes; the paths removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        logger.info("removed %d stale socket directories of dead processes", len(removed))
    return removed


def make_socket_dir(kind: str) -> str:
    """A new 0700 directory for this process's ipc sockets (stale ones cleaned first)."""
    clean_stale_socket_dirs()
    return tempfile.mkdtemp(prefix=f"shoal-{kind}-{os.getpid()}-")
