"""Read back a W&B run file (``run-<id>.wandb``) without network or the W&B service.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
of chunks (crc32 4 bytes, length 2, type 1: full/first/middle/last), each record a
``wandb_internal_pb2.Record``. Used by the W&B logger (what an earlier attempt of a run
logged), by tests, and by anyone auditing offline runs before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    pos = _HEADER  # file header
    pending = b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + _HEADER + length > len(data):
            return  # a file cut short by a killed process ends at its last whole record
        body = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""


def read_run_file(path: Path) -> dict[str, Any]:
    """History rows, summary, config, group and tags recorded in a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run": {}}
    for chunk in _chunks(data):
        rec = pb.Record()
        rec.ParseFromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "run":
            for i in rec.run.config.update:  # the initial config travels with the run record
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            out["run"] = {
                "id": rec.run.run_id,
                "group": rec.run.run_group,
                "tags": list(rec.run.tags),
                "project": rec.run.project,
                "name": rec.run.display_name,
            }
    return out


def last_steps(folder: Path) -> dict[str, int]:
    """Per metric, the last step logged in any run file under ``folder`` (a run's ``wandb/``).

    What a killed attempt handed to W&B but never wrote is not in its file, so it is not
    counted: a resumed attempt logs it again.
    """
    out: dict[str, int] = {}
    for path in Path(folder).glob("*run-*/run-*.wandb"):
        try:
            history = read_run_file(path)["history"]
        except Exception as err:  # an unreadable file: its steps may reach W&B twice
            print(f"[qtl] cannot read {path} ({err!r}); its steps are not deduplicated")
            continue
        for row in history:
            step = row.get("_step")
            for key in row:
                if step is not None and not key.startswith("_"):
                    out[key] = max(out.get(key, -1), int(step))
    return out
