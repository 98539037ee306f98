"""The machine's own memory bandwidth, and the floor it sets under a simulator step.

A STREAM-like copy and triad (McCalpin's kernels) over arrays of at least 8x the last-level
cache, on every core, gives the rate at which the machine moves bytes to and from DRAM. The
whole-circuit kernel's step moves a known number of state-sized passes (counted below from
``statevector.cc``'s loop structure); that many bytes over the triad rate is the step's floor,
and a step's distance from it says how much a better kernel could still win. When one
example's states fit in the last-level cache the passes are served from it, not DRAM, and a
step can come in under this floor: the distance is then below 1x, and says so.
"""

from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_LOW_BITS = 11  # statevector.cc kLowBits: rows of 2^11 floats
_TILE_BITS = 8  # statevector.cc kTileBits: one tile pass per 8 high bits


def llc_bytes() -> int:
    """The largest CPU cache (sysfs on Linux; 32 MiB when it cannot be read)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 * 2**20


def _stream_lib() -> ctypes.CDLL | None:
    from qtl.quantum import kernels

    lib = kernels._library()
    if lib is None or not hasattr(lib, "qtl_stream_triad"):
        return None
    f = ctypes.POINTER(ctypes.c_float)
    lib.qtl_stream_copy.argtypes = (f, f, ctypes.c_int64)
    lib.qtl_stream_triad.argtypes = (f, f, f, ctypes.c_float, ctypes.c_int64)
    return lib


def memory_bandwidth(reps: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Best-of-``reps`` copy and triad rates (GB/s, 1e9 bytes; STREAM's byte counts: copy 2
    arrays, triad 3) on ``threads`` threads (default: every core), arrays >= 8x the LLC."""
    llc = llc_bytes()
    n = max(8 * llc, 64 * 2**20) // 4
    threads = threads or os.cpu_count() or 1
    a, b, c = (np.full(n, v, np.float32) for v in (1.0, 2.0, 0.5))  # pages touched now
    lib = _stream_lib()
    bounds = [(n * t // threads, n * (t + 1) // threads) for t in range(threads)]
    fp = ctypes.POINTER(ctypes.c_float)

    def ptr(x: np.ndarray, lo: int) -> Any:
        return ctypes.cast(x.ctypes.data + 4 * lo, fp)

    def copy(lo: int, hi: int) -> None:
        if lib:
            lib.qtl_stream_copy(ptr(c, lo), ptr(a, lo), hi - lo)
        else:
            np.copyto(c[lo:hi], a[lo:hi])

    def triad(lo: int, hi: int) -> None:
        if lib:
            lib.qtl_stream_triad(ptr(a, lo), ptr(b, lo), ptr(c, lo), 3.0, hi - lo)
        else:  # two passes: numpy has no fused triad (only without the native library)
            np.multiply(c[lo:hi], 3.0, out=a[lo:hi])
            np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

    best = {"copy": float("inf"), "triad": float("inf")}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            for name, fn in (("copy", copy), ("triad", triad)):
                t0 = time.perf_counter()
                list(pool.map(lambda lh, fn=fn: fn(*lh), bounds))
                best[name] = min(best[name], time.perf_counter() - t0)
    return {
        "copy_gbs": 2 * 4 * n / best["copy"] / 1e9,
        "triad_gbs": 3 * 4 * n / best["triad"] / 1e9,
        "array_mib": 4 * n / 2**20,
        "llc_mib": llc / 2**20,
        "threads": threads,
        "method": "native loops" if lib else "numpy",
    }


def state_passes(n: int, layers: int) -> int:
    """State-sized (4 * 2^n byte) reads plus writes, per example, of one value_and_grad step
    through the whole-circuit kernel: its forward call, then its backward call (which
    recomputes the forward, keeping every layer, and runs the adjoint back)."""
    tiles = -(-max(0, n - _LOW_BITS) // _TILE_BITS)  # tile passes per layer (high bits)
    layer = 2 + 2 * tiles  # gather row pass (read + write), each tile pass (read + write)
    build = 1 + 2 * tiles + (layers - 1) * layer  # product layer writes; later layers gather
    forward = build + 1  # the measurement reads the last state
    high = 0 if tiles == 0 else 3 if tiles == 1 else 4 * tiles  # Grams fused with U^T or not
    back = sum((2 if k == layers - 1 else 3) + high + 2 for k in range(layers))
    return forward + build + back + 1  # the last gather back to the product state


def floor_ms(n: int, layers: int, batch: int, gbs: float) -> float:
    """The step's memory floor: every pass's bytes over ``gbs`` (GB/s), in milliseconds."""
    return state_passes(n, layers) * 4 * 2**n * batch / (gbs * 1e9) * 1e3
