"""Builds shoal's C++ CPU kernels once, lazily, with the system compiler.

``load_kernel(name)`` compiles ``csrc/<name>.cpp`` with ``torch.utils.cpp_extension``
(``-O3 -march=native -fopenmp``) into ``$SHOAL_CACHE_DIR/kernels/<name>-<hash>``
(default ``~/.cache/shoal``); the hash covers the source, the shared headers
(``csrc/*.h``), the flags, the torch version and the CPU's flags, so a changed file, torch or machine builds afresh and a warm start only
loads the shared object. Concurrent builders (tp ranks of one host) wait on the
build directory's lock. No compiler: :class:`KernelBuildError` says what to install.
Set ``SHOAL_DISABLE_KERNELS=1`` to use the pure-torch paths only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch.utils import cpp_extension

from shoal.errors import ShoalError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -fopenmp: ATen's parallel_for is inline OpenMP code; the extension then resolves
# libgomp.so.1 to the copy torch has already loaded, so both share one thread pool.
# tuples: torch's cpp_extension.load extends the flag lists it is given in place (a
# shared list once leaked its additions into the next kernel's build hash)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
# fused_ops rounds where the torch ops it replaces round: no FMA contraction there
EXTRA_CFLAGS = {"fused_ops": ("-ffp-contract=off",)}


class KernelBuildError(ShoalError):
    """A C++ kernel could not be built or loaded."""


def cache_root() -> Path:
    """Where shoal keeps built things: ``$SHOAL_CACHE_DIR`` or ``~/.cache/shoal``."""
    return Path(os.environ.get("SHOAL_CACHE_DIR") or Path.home() / ".cache" / "shoal")


def kernels_enabled() -> bool:
    """False when ``SHOAL_DISABLE_KERNELS`` is set to anything but ``0``."""
    return os.environ.get("SHOAL_DISABLE_KERNELS", "0") in ("", "0")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise KernelBuildError(
            "shoal's CPU kernels are built with the system C++ compiler and none was found: "
            "install one (Debian/Ubuntu: `apt-get install g++`; Fedora: `dnf install gcc-c++`), "
            "or set SHOAL_DISABLE_KERNELS=1 to run the slower pure-torch paths"
        )
    return cxx


@functools.cache
def load_kernel(name: str) -> None:
    """Build (first use) and load ``csrc/<name>.cpp``, which registers ``torch.ops.shoal.*``."""
    source = CSRC / f"{name}.cpp"
    _compiler()
    cflags = CFLAGS + EXTRA_CFLAGS.get(name, ())

    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(CSRC.glob("*.h"))]  # shared by every kernel
    for part in (source.read_bytes(), *headers, torch.__version__.encode(),
                 _cpu_flags().encode(), " ".join(cflags + LDFLAGS).encode()):
        digest.update(part)
    tag = digest.hexdigest()[:16]
    build_dir = cache_root() / "kernels" / f"{name}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    built = build_dir / f"shoal_{name}_{tag}.so"
    if built.exists():
        # the tag hashes the source, torch, flags and CPU: a built library is current.
        # Loading it directly skips torch's build lock, which a process killed while
        # holding it (kill -9 of a starting worker) leaves behind for everyone to wait on.
        try:
            torch.ops.load_library(str(built))
            logger.info("loaded C++ kernel %s from %s", name, built)
            return
        except (RuntimeError, OSError) as exc:  # a torn file from a killed build: rebuild
            logger.warning("could not load %s (%s); rebuilding it", built, exc)
    try:
        cpp_extension.load(
            name=f"shoal_{name}_{tag}",
            sources=[str(source)],
            extra_cflags=list(cflags),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise KernelBuildError(
            f"building the C++ kernel {name!r} in {build_dir} failed: {exc}. Check that a C++ "
            "compiler and ninja are installed (`pip install ninja`), or set "
            "SHOAL_DISABLE_KERNELS=1"
        ) from exc
    logger.info("loaded C++ kernel %s from %s", name, build_dir)


def kernel_loaded(name: str, fallback: str) -> bool:
    """:func:`load_kernel` where kernels are enabled; False (a warning saying what runs
    instead, ``fallback``) when disabled or the build fails. Callers cache the answer."""
    if not kernels_enabled():
        return False
    try:
        load_kernel(name)
    except KernelBuildError as exc:
        logger.warning("C++ kernel %s unavailable, %s instead: %s", name, fallback, exc)
        return False
    return True
