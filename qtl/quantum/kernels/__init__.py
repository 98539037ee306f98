"""Native CPU kernels for the fast simulator, built with the system C++ compiler on first use.

Why native code: XLA runs the simulator's circuit as whole-batch ops, each streaming every
example's state through DRAM. ``statevector.cc`` takes one example's state through the whole
circuit while it stays in cache, forward and adjoint backward (two XLA FFI custom calls);
``wire_gram.cc`` serves the per-layer path (``native="gram"``): each wire's 2x2 gradient Gram,
where XLA would need a full 2^k x 2^k GEMM on one thread. Both run on XLA's intra-op thread
pool through one loop that cannot deadlock when called from that pool (``common.h``).

Why built on first use rather than shipped: they are two small files against the installed jaxlib's
FFI headers, built into one library in seconds wherever JAX runs, with no wheel per platform, and
built for the machine they run on: the kernels are written with the compiler's portable vector types
(no intrinsics), and ``-march=native`` (``-mcpu=native`` on ARM) lets one source become AVX-512,
AVX2+FMA or NEON code, with vectors as wide as that machine's registers. ``$QTL_ISA`` forces the
instruction set down (``avx512``, ``avx2``, ``baseline``: SSE2 on x86-64, NEON on ARM64), so any
machine can test every path (see :data:`ISAS`). The library is cached under ``$QTL_KERNEL_CACHE``
(default ``~/.cache/qtl/kernels``), keyed by the sources, jaxlib version, compiler, instruction-set
flags, and for a native build the CPU model and its feature flags, and written atomically, so
concurrent sweep jobs share one build. Without a compiler (or with ``QTL_NATIVE=0``) the simulator
keeps its XLA path: same results, slower; a warning says why.

Loading a shared object runs its code, so a cached one is trusted only as built: each build
writes a manifest (``wire_gram-<key>.json``: the cache key, the library's file name and its
sha256), and before loading, the library's bytes are hashed and compared with it; both
files must belong to this user (or root) and be writable by no one else. Anything else (a
changed byte, a swapped file, a foreign owner) is not loaded: a warning says why and the
library is rebuilt. The bytes that were checked are the bytes loaded (from an in-memory
copy where Linux allows), so a file swapped in between is never run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from qtl.utils.errors import Handled
from qtl.utils.files import atomic_write_bytes

HERE = Path(__file__).parent
SOURCES = (  # one library
    HERE / "wire_gram.cc",
    HERE / "statevector.cc",
    HERE / "complex_circuit.cc",
    HERE / "stream.cc",
)
HEADERS = (HERE / "common.h",)
TARGET = "qtl_wire_gram"
FORWARD = "qtl_statevector_forward"
BACKWARD = "qtl_statevector_backward"
COMPLEX_FORWARD = "qtl_complex_forward"
COMPLEX_BACKWARD = "qtl_complex_backward"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# QTL_ISA: the instruction set the kernels are built for. "native": whatever this CPU has
# (the default); the others force it down (for tests and A/B): on x86-64 "avx512"
# (Skylake-SP's set and tuning), "avx2" (Haswell's: AVX2 + FMA) and
# "baseline" (x86-64: SSE2); on ARM64 "baseline" is ARMv8-A with NEON.
ISAS = ("native", "avx512", "avx2", "baseline")
_ISA_CPU_FLAG = {"avx512": "avx512f", "avx2": "avx2"}  # /proc/cpuinfo flag each one needs


_MEMFDS: list[int] = []  # in-memory copies of the loaded libraries (see _dlopen)
_BUILT: dict[str, str] = {}  # library file name -> the ISA level it was built for


class KernelUnavailable(Handled, RuntimeError):
    """The native kernel could not be built or loaded here."""


def cache_dir() -> Path:
    """Where built kernels live: ``paths.kernel_dir``, which the applications export as
    ``$QTL_KERNEL_CACHE`` (this code runs while tracing, without a config)."""
    from qtl.utils.paths import kernel_dir

    return kernel_dir()


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++ or clang++)")


@functools.cache
def cpu_info() -> dict:
    """This CPU's model name, core count and the vector ISA flags that matter here (from
    /proc/cpuinfo on Linux; the model from ``platform`` elsewhere)."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    machine = platform.machine()
    return {
        "model": fields.get("model name") or fields.get("CPU part") or platform.processor(),
        "machine": machine,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "neon": "asimd" in flags or machine in ("aarch64", "arm64"),
        "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
    }


def isa() -> str:
    """The requested instruction set: ``$QTL_ISA`` or "native"."""
    want = os.environ.get("QTL_ISA", "native").strip().lower() or "native"
    if want not in ISAS:
        raise KernelUnavailable(f"QTL_ISA={want!r} is not one of {', '.join(ISAS)}")
    return want


def isa_flags(level: str, machine: str | None = None) -> tuple[str, ...]:
    """Compiler flags that build the kernels for ``level`` on ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    x86 = machine in ("x86_64", "AMD64")
    arm = machine in ("aarch64", "arm64")
    if level == "native":
        return ("-march=native",) if x86 else ("-mcpu=native",) if arm else ()
    if level == "baseline":
        return ("-march=x86-64",) if x86 else ("-march=armv8-a",) if arm else ()
    if not x86:
        raise KernelUnavailable(f"QTL_ISA={level} is an x86-64 instruction set; this is {machine}")
    return ("-march=skylake-avx512",) if level == "avx512" else ("-march=haswell",)


def _check_cpu(level: str) -> None:
    # code built for a set the CPU lacks dies of SIGILL at its first vector instruction
    flag = _ISA_CPU_FLAG.get(level)
    if flag and not cpu_info()[flag]:
        raise KernelUnavailable(f"QTL_ISA={level}: this CPU ({cpu_info()['model']}) has no {flag}")


def _key(level: str) -> tuple[str, str, str, tuple[str, ...]]:
    """(compiler, FFI include dir, cache key of a build from this source, ISA flags)."""
    import jax
    import jaxlib

    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    flags = isa_flags(level)
    # -march=native means this CPU: its model and feature flags are part of what was built
    cpu = cpu_info()
    machine_id = [cpu["model"], cpu["flags_sha"]] if level == "native" else []
    key = hashlib.sha256(
        "\n".join(
            [
                *(f.read_text() for f in (*SOURCES, *HEADERS)),
                jaxlib.__version__,
                version,
                platform.machine(),
                *FLAGS,
                *flags,
                *machine_id,
            ]
        ).encode()
    ).hexdigest()[:16]
    return cxx, jax.ffi.include_dir(), key, flags


def _untrusted(path: Path) -> str | None:
    """Why a cached file cannot be trusted as this user's own build, or None."""
    st = path.stat()
    if st.st_uid not in (os.getuid(), 0):
        return f"{path} belongs to user id {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {oct(st.st_mode & 0o777)})"
    return None


def _verified(manifest: Path, key: str) -> tuple[Path, bytes] | str | None:
    """The cached library and its bytes when they match the manifest; else why not (None:
    nothing cached)."""
    if not manifest.exists():
        return None
    try:
        if reason := _untrusted(manifest):
            return reason
        meta = json.loads(manifest.read_text())
        name, want = meta["library"], meta["sha256"]
        if meta.get("key") != key or not re.fullmatch(rf"wire_gram-{key}-[0-9a-f]{{16}}\.so", name):
            return f"{manifest} does not describe a build with key {key}"
        lib = manifest.with_name(name)
        if reason := _untrusted(lib):
            return reason
        data = lib.read_bytes()
    except FileNotFoundError as err:
        return f"{err.filename} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({type(err).__name__}: {err})"
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        return f"{lib} has sha256 {got[:16]}..., not the {str(want)[:16]}... recorded at build"
    return lib, data


def _write(path: Path, data: bytes, mode: int) -> None:
    # atomic (a concurrent job sees no file or a whole one), with ``mode`` whatever the
    # umask: a group-writable file would not be trusted
    atomic_write_bytes(path, data, mode=mode)


def _ensure(cache: Path | None) -> tuple[Path, bytes]:
    """The verified library (built now if it is missing or fails verification), for the
    requested ISA; a native build that the compiler refuses falls back to the baseline."""
    level = isa()
    _check_cpu(level)
    compiler()  # no compiler: no point in a baseline retry
    try:
        found = _ensure_level(cache, level)
    except KernelUnavailable as err:
        if level != "native" or not isa_flags("native"):
            raise
        warnings.warn(
            f"qtl: the native-ISA kernel build failed; building the baseline one: {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        level = "baseline"
        found = _ensure_level(cache, level)
    _BUILT[found[0].name] = level
    return found


def _ensure_level(cache: Path | None, level: str) -> tuple[Path, bytes]:
    cxx, include, key, flags = _key(level)
    cache = cache or cache_dir()
    manifest = cache / f"wire_gram-{key}.json"
    found = _verified(manifest, key)
    if isinstance(found, tuple):
        return found
    if found is not None:
        warnings.warn(
            f"qtl: not loading the cached native kernel: {found}; rebuilding it",
            RuntimeWarning,
            stacklevel=3,
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".wire_gram-{key}.{os.getpid()}.tmp"
    print(
        f"qtl: building the native CPU kernel (once, ISA {level}) in {cache}",
        file=sys.stderr,
        flush=True,
    )
    try:
        _compile(cxx, [*flags, "-DQTL_ISA_BUILD", f"-I{include}"], tmp)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    # named by its content: a concurrent build never changes the bytes a manifest points at
    lib = cache / f"wire_gram-{key}-{digest[:16]}.so"
    _write(lib, data, 0o755)
    meta = {
        "key": key,
        "library": lib.name,
        "sha256": digest,
        "compiler": cxx,
        "isa": level,
        "flags": list(flags),
        "cpu": cpu_info()["model"],
    }
    _write(manifest, (json.dumps(meta, indent=1) + "\n").encode(), 0o644)
    return lib, data


def _compile(cxx: str, flags: list[str], out: Path) -> None:
    """Every source in its own compiler process, all at once, then one link: the build takes
    about its longest source's time rather than the sum (on 2 cores, ~half)."""
    objects = [out.with_name(f"{out.name}.{src.stem}.o") for src in SOURCES]
    try:
        jobs = []
        for src, obj in zip(SOURCES, objects, strict=True):
            cmd = [cxx, *FLAGS, *flags, "-c", str(src), "-o", str(obj)]
            jobs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
        failed = None
        for cmd, job in jobs:
            err = job.communicate()[1]
            if job.returncode != 0 and failed is None:
                failed = (cmd, err)
        if failed is None:
            cmd = [cxx, *FLAGS, *flags, *map(str, objects), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                failed = (cmd, done.stderr)
        if failed is not None:
            raise KernelUnavailable(f"{' '.join(failed[0])} failed:\n{failed[1][-2000:]}")
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)


def build(cache: Path | None = None) -> Path:
    """Compile the kernels' sources into the cache (once per source/jaxlib/compiler, and again if
    the cached library fails verification); the verified library's path."""
    return _ensure(cache)[0]


def _dlopen(data: bytes, path: Path) -> ctypes.CDLL:
    """Load exactly ``data`` (already verified): from an anonymous in-memory file where the
    system has them, else from ``path``."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(path.name, os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:  # e.g. memfd execution disabled (vm.memfd_noexec)
            os.close(fd)
        else:
            # kept open: the loader knows libraries by path, and a reused fd number would
            # make a later load return this library instead of the one asked for
            _MEMFDS.append(fd)
            return lib
    return ctypes.CDLL(str(path))


def load(cache: Path | None = None) -> ctypes.CDLL:
    """The native kernel library, built if needed, loaded only after its hash is checked."""
    path, data = _ensure(cache)
    return _dlopen(data, path)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with a warning) when it cannot be built here or
    ``QTL_NATIVE=0``."""
    if os.environ.get("QTL_NATIVE", "1") == "0":
        return None
    try:
        return load()
    except (KernelUnavailable, OSError) as err:
        warnings.warn(
            f"qtl: native CPU kernel unavailable, using XLA for the circuit "
            f"(same results, ~3x slower at 19 qubits): {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def selected() -> dict:
    """Which kernel runs here: the requested ISA, the vector instructions the loaded library
    was compiled to (from its own preprocessor macros), and its flags; ``{"kernel": "xla"}``
    where no native kernel loads."""
    lib = _library()
    if lib is None:
        return {"kernel": "xla"}
    try:
        lib.qtl_kernel_isa.restype = ctypes.c_char_p
        vector = lib.qtl_kernel_isa().decode()
    except AttributeError:  # a library without the query (never one built from these sources)
        vector = "unknown"
    level = next(iter(_BUILT.values()), isa()) if len(_BUILT) <= 1 else isa()
    return {"kernel": "native", "isa": level, "vector": vector, "flags": list(isa_flags(level))}


@functools.cache
def _registered() -> bool:
    """Register the kernels with XLA:CPU; False (with a warning) when they cannot be built
    here or ``QTL_NATIVE=0``."""
    lib = _library()
    if lib is None:
        return False
    import jax

    for name, symbol in (
        (TARGET, lib.QtlWireGram),
        (FORWARD, lib.QtlStatevectorForward),
        (BACKWARD, lib.QtlStatevectorBackward),
        (COMPLEX_FORWARD, lib.QtlComplexForward),
        (COMPLEX_BACKWARD, lib.QtlComplexBackward),
    ):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


def wire_gram_target() -> str | None:
    """The wire-Gram kernel's FFI target name, or None where the kernels do not run."""
    return TARGET if _registered() else None


def statevector_targets() -> tuple[str, str] | None:
    """The whole-circuit kernels' (forward, backward) FFI targets, or None."""
    return (FORWARD, BACKWARD) if _registered() else None


def complex_targets() -> tuple[str, str] | None:
    """The complex-circuit kernels' (forward, backward) FFI targets (``complex_circuit.cc``:
    few-qubit complex circuits over a large batch, the QViT's), or None."""
    return (COMPLEX_FORWARD, COMPLEX_BACKWARD) if _registered() else None
