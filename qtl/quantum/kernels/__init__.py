"""Native CPU kernels for the fast simulator, built with the system C++ compiler on first use.

Why native code: the rotation layers' weight gradient needs only a 2x2 Gram matrix per wire,
but XLA can only get it from a full 2^k x 2^k GEMM that XLA:CPU runs on one thread (about a
third of the n=19 step's operation time). ``wire_gram.cc`` computes just what is needed, in
one read of each state, over XLA's intra-op thread pool (an XLA FFI custom call).

Why built on first use rather than shipped: it is one small file against the installed
jaxlib's FFI headers, so it compiles in seconds wherever JAX runs, with no wheel per platform.
The library is cached under ``$QTL_KERNEL_CACHE`` (default ``~/.cache/qtl/kernels``), keyed
by the source, jaxlib version, compiler and machine type, and written atomically, so
concurrent sweep jobs share one build. Without a compiler (or with ``QTL_NATIVE=0``) the
simulator keeps its XLA path: same results, a little slower; a warning says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("wire_gram.cc")
TARGET = "qtl_wire_gram"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
    """The native kernel could not be built or loaded here."""


def cache_dir() -> Path:
    """Where built kernels live (``$QTL_KERNEL_CACHE``, else ``~/.cache/qtl/kernels``)."""
    env = os.environ.get("QTL_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qtl" / "kernels"


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++ or clang++)")


def build(cache: Path | None = None) -> Path:
    """Compile ``wire_gram.cc`` into the cache (once per source/jaxlib/compiler) and return it."""
    import jax
    import jaxlib

    cxx = compiler()
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), jaxlib.__version__, version, platform.machine(), *FLAGS]
        ).encode()
    ).hexdigest()[:16]
    cache = cache or cache_dir()
    lib = cache / f"wire_gram-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{lib.name}.{os.getpid()}.tmp"
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp)]
    print(f"qtl: building the native CPU kernel (once): {lib}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelUnavailable(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent job sees no library or a whole one
    return lib


@functools.cache
def wire_gram_target() -> str | None:
    """Register the wire-Gram kernel with XLA:CPU; its FFI target name, or None (with a warning)
    when it cannot be built here or ``QTL_NATIVE=0``."""
    if os.environ.get("QTL_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (KernelUnavailable, OSError) as err:
        warnings.warn(
            f"qtl: native CPU kernel unavailable, using XLA for rotation gradients "
            f"(same results, ~15% slower at 19 qubits): {err}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    import jax

    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.QtlWireGram), platform="cpu")
    return TARGET
