"""Stale ipc socket directories of dead processes are removed when a new one is made."""
import os
import subprocess
import sys

from shoal.comm.socket_dirs import clean_stale_socket_dirs


def test_dirs_of_dead_pids_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"shoal-api-{dead.pid}-abc123"
    live = tmp_path / f"shoal-driver-{os.getpid()}-def456"
    other = tmp_path / "shoal-serve-xyz.log"  # not a socket directory: never touched
    for d in (stale, live):
        d.mkdir()
        (d / "in").write_text("")
    other.write_text("log")
    assert clean_stale_socket_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()
