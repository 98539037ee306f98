"""How one preprocessed image is stored: row-delta filter -> safetensors -> zstandard.

Only the uint8 grayscale crop is stored (normalisation and the 3-channel copy are cheap on
the device). Storing each row as its difference to the row above (PNG's "Up" filter, mod
256) turns the smooth anatomy into small numbers that zstd packs ~35% tighter; undoing it is
a prefix sum done in log2(H) vectorised adds. The zstd frame carries a checksum, so a damaged
entry fails to decode instead of being served.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FILTER = "up"  # the row-delta filter; recorded in every entry
_LEVEL = 1  # zstd level: with the filter, higher levels gain < 3% and encode 2-10x slower


_local = threading.local()  # zstd contexts are not thread-safe, and costly to create per call


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


class CorruptEntry(ValueError):
    """A cached value that does not decode to a valid image (damaged or foreign)."""


def _unfilter(delta: np.ndarray) -> np.ndarray:
    """Inverse of the Up filter: cumulative sum down the rows, mod 256, in log2(H) steps."""
    out = delta.copy()
    step = 1
    while step < out.shape[0]:
        out[step:] += out[:-step].copy()  # uint8 wraps, matching the filter's mod 256
        step *= 2
    return out


def encode(image: np.ndarray) -> bytes:
    """(H, W) uint8 -> compressed bytes."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    delta = image.copy()
    delta[1:] -= image[:-1]
    blob = st_save({"pixels": delta}, metadata={"filter": FILTER})
    return zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True).compress(blob)


def decode(blob: bytes) -> np.ndarray:
    """Compressed bytes -> (H, W) uint8, or :class:`CorruptEntry`."""
    try:
        raw = _decompressor().decompress(blob)
        delta = st_load(raw)["pixels"]
    except Exception as err:  # zstd checksum/frame errors, safetensors header errors
        raise CorruptEntry(f"undecodable cache entry ({type(err).__name__}: {err})") from None
    if delta.ndim != 2 or delta.dtype != np.uint8:
        raise CorruptEntry(f"cache entry holds {delta.dtype} {delta.shape}, not a 2-D uint8 image")
    return _unfilter(delta)
