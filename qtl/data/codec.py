"""How one preprocessed image is stored: row-delta filter -> safetensors -> zstandard.

Only the uint8 grayscale crop is stored (normalisation and the 3-channel copy are cheap on
the device). Storing each row as its difference to the row above (PNG's "Up" filter, mod
256) turns the smooth anatomy into small numbers that zstd packs ~35% tighter; undoing it is
a prefix sum done in log2(H) vectorised adds. The zstd frame carries a checksum, so a damaged
entry fails to decode instead of being served.

Before anything is decompressed or parsed, :func:`decode` checks that the bytes are this
encoding (zstd magic, a declared size within bounds, a safetensors header holding exactly
one 2-D uint8 ``pixels`` tensor tagged with this filter): an entry written by anything else
is refused as :class:`CorruptEntry`, never decoded as if it were an image.
"""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import zstandard
from safetensors.numpy import save as st_save

from qtl.utils.errors import Handled

FILTER = "up"  # the row-delta filter; recorded in every entry
_LEVEL = 1  # zstd level: with the filter, higher levels gain < 3% and encode 2-10x slower
_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame
# Largest decompressed entry accepted: a 8192 x 8192 crop plus its header. A frame that
# declares more is refused before memory is allocated for it.
MAX_ENTRY_BYTES = 8192 * 8192 + 4096


_local = threading.local()  # zstd contexts are not thread-safe, and costly to create per call


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


class CorruptEntry(Handled, ValueError):
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


def _check_frame(blob: object) -> None:
    """The zstd frame header: magic, and a declared size this encoding can have."""
    if not isinstance(blob, bytes):
        raise CorruptEntry(f"cache entry is a {type(blob).__name__}, not qtl's encoded bytes")
    if not blob.startswith(_MAGIC):
        raise CorruptEntry(f"not qtl's image encoding (starts {blob[:8]!r}, not a zstd frame)")
    try:
        size = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as err:
        raise CorruptEntry(f"not qtl's image encoding (zstd frame header: {err})") from None
    if size < 0 or size > MAX_ENTRY_BYTES:
        declared = "no size" if size < 0 else f"{size} bytes"
        raise CorruptEntry(
            f"not qtl's image encoding (the zstd frame declares {declared}; qtl writes the "
            f"size, at most {MAX_ENTRY_BYTES})"
        )


def _check_tensor(raw: bytes) -> tuple[int, tuple[int, int]]:
    """The safetensors header: one 2-D uint8 tensor ``pixels``, this filter, sizes that add up.
    Returns where the pixels start and their shape."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        pixels, meta = header["pixels"], header.get("__metadata__")
        shape = [int(x) for x in pixels["shape"]]
        ok = (
            set(header) <= {"pixels", "__metadata__"}
            and pixels["dtype"] == "U8"
            and len(shape) == 2
            and pixels["data_offsets"] == [0, shape[0] * shape[1]]
            and len(raw) == 8 + n + shape[0] * shape[1]
        )
    except (struct.error, ValueError, TypeError, KeyError) as err:
        raise CorruptEntry(f"not qtl's image encoding (safetensors header: {err})") from None
    if not ok:
        raise CorruptEntry(f"not qtl's image encoding (safetensors header {header})")
    if meta != {"filter": FILTER}:
        raise CorruptEntry(f"cache entry written with metadata {meta}, not filter {FILTER!r}")
    return 8 + n, (shape[0], shape[1])


def decode(blob: bytes) -> np.ndarray:
    """Compressed bytes -> (H, W) uint8, or :class:`CorruptEntry`."""
    _check_frame(blob)
    try:
        raw = _decompressor().decompress(blob)
    except zstandard.ZstdError as err:  # checksum or frame damage
        raise CorruptEntry(f"undecodable cache entry (ZstdError: {err})") from None
    start, shape = _check_tensor(raw)  # every byte accounted for: read the pixels directly
    delta = np.frombuffer(raw, np.uint8, count=shape[0] * shape[1], offset=start)
    return _unfilter(delta.reshape(shape))
