"""Build and load the fused CPU decode kernel (`csrc/decode_cpu.cpp`) once per machine.

The C++ source is compiled on first use with `torch.utils.cpp_extension` (ninja from PyPI,
the system's g++), with `-march=native`, into `$LOGQUANT_CACHE_DIR/torch_extensions/<key>`.
The key hashes the source, the torch and Python versions, the compiler flags and the CPU's
instruction-set flags, so a cached build never runs on a CPU with other instructions: a
different CPU (or a new torch) builds its own copy. Later starts only load the cached
library (ninja finds it up to date).

`load_cpu_kernel()` returns the op, or raises `KernelBuildError` saying why it cannot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from logquant.models import cache_dir

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "decode_cpu.cpp"
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("simd.h", "tiles.h"))
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
# -fopenmp links libgomp.so.1: the dynamic loader reuses the one libtorch_cpu already loaded
# (same soname), so at::parallel_for runs on torch's own thread pool, not a second runtime.
LDFLAGS = ("-fopenmp",)


class KernelBuildError(RuntimeError):
    """The CPU kernel cannot be built or loaded here (the message says why)."""


def isa_flags() -> str:
    """The CPU's instruction-set flags (x86 `flags`, ARM `Features`), sorted, or the
    processor name where /proc/cpuinfo is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return platform.machine()


def build_key() -> str:
    """What a build depends on: source, torch, Python, flags, machine and its instructions."""
    parts = [
        SOURCE.read_bytes(),
        *(h.read_bytes() for h in HEADERS),
        torch.__version__.encode(),
        sys.version.encode(),
        " ".join(CFLAGS).encode(),
        platform.machine().encode(),
        isa_flags().encode(),
    ]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@contextmanager
def _ninja_on_path():
    """cpp_extension runs `ninja` from PATH; a venv's python may run without its bin on PATH."""
    try:
        import ninja

        extra = ninja.BIN_DIR
    except (ImportError, AttributeError):
        extra = os.path.dirname(sys.executable)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{extra}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _check_toolchain() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelBuildError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    if not torch.backends.openmp.is_available():
        raise KernelBuildError("this torch build has no OpenMP thread pool")


def _first_error(message: str) -> str:
    """The compiler's first `error:` line of a failed build, else the message's last line."""
    lines = message.strip().splitlines() or ["unknown error"]
    errors = [line.strip() for line in lines if "error:" in line]
    return (errors or lines[-1:])[0][:300]


@lru_cache(maxsize=1)
def load_cpu_kernel() -> Callable[..., None]:
    """Compile (first time on this machine) and load the kernel; return its op."""
    _check_toolchain()
    build_dir = cache_dir() / "torch_extensions" / build_key()
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    try:
        with _ninja_on_path():
            load(
                name=f"logquant_cpu_{build_key()}",
                sources=[str(SOURCE)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except (RuntimeError, OSError, ImportError) as exc:  # compiler errors arrive as RuntimeError
        raise KernelBuildError(f"building the CPU kernel failed: {_first_error(str(exc))}") from exc
    return torch.ops.logquant_cpu.decode_attention
