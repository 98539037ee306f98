"""The frozen-backbone feature cache: each image's pooled features, computed once, ever.

With ``backbone.freeze=true`` the backbone is a fixed function, so every run of a sweep (any
head, seed or search trial) would compute the same features again in every epoch. Here they
are computed once per split and stored beside the image cache (``paths.feature_cache``):

    <feature_cache>/<key>/plan.json        what is being filled: the key's parts, rows, chunking
                         chunk-00000.qtlf  feature vectors [0, chunk), one file per chunk
                         manifest.json     written last: the split is complete
                         .lock             one filler at a time

The key hashes what decides the stored values: the backbone's loaded arrays themselves
(weights and batch-norm statistics, not a name: ``qtl.train.features.backbone_digest``), the
preprocessing (resize, crop, the resampling filter, the normalisation constants), the split
(its label file's identity and ordered image paths, as the image index) and the stored dtype.

Writes are whole or nothing: every chunk and the manifest are written to a temporary file and
renamed (:func:`qtl.utils.files.atomic_write_bytes`). A killed fill keeps its finished chunks;
the rerun verifies them and computes only the others. Concurrent runs of a sweep serialise on
the split's lock: the first fills, the others wait and then read. A run that finds the
manifest reads the chunks only (it never opens the image cache nor a source image).

Trust: a chunk is raw array bytes behind a small JSON header (magic, dtype, shape, the sha256
of the array bytes), optionally zstd-compressed with a size bound; nothing is unpickled. A
chunk that fails any check is reported and recomputed from the images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from qtl.data.cache import Prep
from qtl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from qtl.data.records import DataError
from qtl.progress import bar
from qtl.utils import faults
from qtl.utils.errors import Handled
from qtl.utils.files import atomic_write_bytes, file_lock, write_json_atomic

FORMAT = 1  # bump when the chunk layout or what the key covers changes
MAGIC = b"QTLF"
_HEADER_MAX = 4096  # bytes of JSON header accepted before anything else is read


class CorruptChunk(Handled, ValueError):
    """A chunk file that is not a whole, matching chunk of this split."""


def prep_tag(prep: Prep) -> dict[str, Any]:
    """Everything between a source image and the backbone's input."""
    return {**prep.tag(), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "gray": "x3"}


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encode_chunk(array: np.ndarray, level: int) -> bytes:
    """(rows, width) float array -> header + (zstd-compressed) bytes."""
    raw = np.ascontiguousarray(array).tobytes()
    codec = "zstd" if level > 0 else "raw"
    header = {
        "format": FORMAT,
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "codec": codec,
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    body = zstandard.ZstdCompressor(level=level).compress(raw) if level > 0 else raw
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def decode_chunk(blob: bytes, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    """The array of a chunk written by :func:`encode_chunk`, or :class:`CorruptChunk`."""
    if not blob.startswith(MAGIC) or len(blob) < 8:
        raise CorruptChunk("not a qtl feature chunk (bad magic)")
    (n,) = struct.unpack("<I", blob[4:8])
    if n > _HEADER_MAX:
        raise CorruptChunk(f"header of {n} bytes (at most {_HEADER_MAX})")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as err:
        raise CorruptChunk(f"unreadable header ({err})") from None
    want = {"format": FORMAT, "dtype": dtype, "shape": list(shape)}
    if not isinstance(header, dict) or any(header.get(k) != v for k, v in want.items()):
        raise CorruptChunk(f"header {header} does not match {want}")
    size = int(np.dtype(dtype).itemsize * shape[0] * shape[1])
    body = blob[8 + n :]
    try:
        if header.get("codec") == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=size)
        elif header.get("codec") == "raw":
            raw = body
        else:
            raise CorruptChunk(f"unknown codec {header.get('codec')!r}")
    except zstandard.ZstdError as err:
        raise CorruptChunk(f"undecodable ({err})") from None
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != header.get("sha256"):
        raise CorruptChunk("its bytes do not match the checksum in its header")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


@dataclass
class FeatureSet:
    """One split's features (rows = the split's readable images, in order)."""

    features: np.ndarray  # (rows, width), the stored dtype
    bad: dict[int, str]  # position in the full split -> why the image was left out
    directory: Path
    computed: int = 0  # vectors computed by this call
    cached: int = 0  # vectors found stored
    stored_bytes: int = 0  # chunk bytes on disk
    chunks: list[dict[str, Any]] = field(default_factory=list)


def _chunk_path(directory: Path, c: int) -> Path:
    return directory / f"chunk-{c:05d}.qtlf"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bounds(rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, rows)) for s in range(0, rows, chunk)]


def _read_chunk(directory: Path, c: int, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    path = _chunk_path(directory, c)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CorruptChunk("missing") from None
    return decode_chunk(blob, dtype, shape)


def _load(directory: Path, parts: dict[str, Any]) -> FeatureSet | None:
    """The split's features when its manifest names this key and every chunk checks out."""
    manifest = _read_json(directory / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("parts") != parts:
        return None
    try:
        rows, width, chunk = (int(manifest[k]) for k in ("rows", "width", "chunk"))
        bad = {int(i): str(r) for i, r in manifest.get("bad", {}).items()}
        stored = sum(int(x["bytes"]) for x in manifest["chunks"])
        if min(rows, width, chunk) < 1:
            raise ValueError("sizes below 1")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        warnings.warn(
            f"feature cache {directory / 'manifest.json'} is damaged ({type(err).__name__}: "
            f"{err}); recomputing the split",
            stacklevel=2,
        )
        return None
    out = np.empty((rows, width), parts["dtype"])
    for c, (s, e) in enumerate(_bounds(rows, chunk)):
        try:
            out[s:e] = _read_chunk(directory, c, parts["dtype"], (e - s, width))
        except CorruptChunk as err:
            warnings.warn(
                f"feature cache {_chunk_path(directory, c)} is unusable ({err}); recomputing it",
                stacklevel=2,
            )
            return None
    return FeatureSet(out, bad, directory, 0, rows, stored, manifest["chunks"])


def features_for(
    directory: Path,
    parts: dict[str, Any],
    *,
    images_for: Callable[[], tuple[Any, dict[int, str]]],
    embed: Callable[[np.ndarray], np.ndarray],
    width: int,
    chunk: int,
    batch_size: int,
    level: int,
    progress: bool = False,
    desc: str = "features",
) -> FeatureSet:
    """One split's features: read when complete, else filled (what is missing only).

    ``images_for()`` -> (the split's readable images, indexable (N, H, W) uint8; the left-out
    positions and reasons): called only when something must be computed. ``embed(batch)``
    maps (batch_size, H, W) uint8 to (batch_size, width) float32; the last batch is padded.
    """
    directory = Path(directory)
    if (found := _load(directory, parts)) is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(
        directory / ".lock", optional=True
    ):  # one filler; the sweep's other runs then read
        if (found := _load(directory, parts)) is not None:
            return found
        images, bad = images_for()
        rows, dtype = len(images), parts["dtype"]
        plan = {
            "parts": parts,
            "rows": rows,
            "width": width,
            "chunk": chunk,
            "bad": {str(i): r for i, r in sorted(bad.items())},
        }
        if _read_json(directory / "plan.json") != plan:  # another fill's chunks: start over
            for old in directory.glob("chunk-*.qtlf"):
                old.unlink()
            write_json_atomic(directory / "plan.json", plan)
        out = np.empty((rows, width), dtype)
        bounds = _bounds(rows, chunk)
        todo = []
        for c, (s, e) in enumerate(bounds):
            try:
                out[s:e] = _read_chunk(directory, c, dtype, (e - s, width))
            except CorruptChunk as err:
                if _chunk_path(directory, c).exists():
                    warnings.warn(
                        f"feature cache {_chunk_path(directory, c)} is unusable ({err}); "
                        "recomputing it",
                        stacklevel=2,
                    )
                todo.append(c)
        computed = sum(bounds[c][1] - bounds[c][0] for c in todo)
        with bar(
            enabled=progress, total=rows, initial=rows - computed, desc=desc, unit="img"
        ) as pbar:
            for c in todo:
                s, e = bounds[c]
                out[s:e] = _embed_rows(images, s, e, embed, batch_size, pbar).astype(dtype)
                atomic_write_bytes(_chunk_path(directory, c), encode_chunk(out[s:e], level))
                faults.point("feature_chunk")
        chunks = [
            {"file": _chunk_path(directory, c).name, "rows": e - s}
            | {"bytes": _chunk_path(directory, c).stat().st_size}
            for c, (s, e) in enumerate(bounds)
        ]
        manifest = {**plan, "chunks": chunks, "raw_bytes": int(out.nbytes), "level": level}
        write_json_atomic(directory / "manifest.json", manifest)  # the commit
    stored = sum(x["bytes"] for x in chunks)
    return FeatureSet(out, bad, directory, computed, rows - computed, stored, chunks)


def _embed_rows(
    images: Any, start: int, end: int, embed: Callable, batch_size: int, pbar: Any
) -> np.ndarray:
    """Features of images [start, end), in padded batches; the next batch is read (decoded
    from the image cache) while the backbone runs on this one."""
    spans = [(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    parts = []

    def read(span: tuple[int, int]) -> np.ndarray:
        x = np.asarray(images[np.arange(*span)])
        if len(x) < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
        return x

    with ThreadPoolExecutor(1, thread_name_prefix="qtl-feat") as pool:
        pending = pool.submit(read, spans[0]) if spans else None
        for i, span in enumerate(spans):
            assert pending is not None
            x = pending.result()
            pending = pool.submit(read, spans[i + 1]) if i + 1 < len(spans) else None
            parts.append(np.asarray(embed(x), np.float32)[: span[1] - span[0]])
            pbar.update(span[1] - span[0])
    if not parts:
        raise DataError(f"no images to compute features of in [{start}, {end})")
    return np.concatenate(parts)


def describe(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete split (sizes, chunks), or None."""
    with contextlib.suppress(Exception):
        return _read_json(Path(directory) / "manifest.json")
    return None
