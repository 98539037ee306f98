"""The gpu_pool launcher's job and result files: signed JSON, never pickle.

Why not pickle: a job folder sits in the sweep directory, where anyone who can write there
(a shared outputs folder, a copied sweep) could leave a file; unpickling it runs their code.
JSON only ever yields data. The config of a job travels as YAML (what Hydra writes to
``.hydra/config.yaml`` too), and since a config can name code to run (``_target_`` of a
callback), both files carry an HMAC under a key that exists only in the launcher and in the
worker it started (passed over the worker's stdin): a file that was changed, swapped in, or
written by anything else is refused with a message naming it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from qtl.utils.errors import QtlUserError
from qtl.utils.files import atomic_write_bytes

JOB = "qtl-gpu-pool-job"
RESULT = "qtl-gpu-pool-result"
VERSION = 1

# Required fields of each body and their JSON types (None: any JSON value).
JOB_FIELDS: dict[str, Any] = {
    "job": int,
    "overrides": list,
    "config_file": str,
    "config_sha256": str,
    "task": dict,
    "version_base": (str, type(None)),
    "resolver_cache": list,
    "callbacks": list,
}
RESULT_FIELDS: dict[str, Any] = {
    "job": int,
    "status": str,
    "return_value": None,
    "return_repr": (str, type(None)),
    "error": (dict, type(None)),
    "task_name": (str, type(None)),
    "working_dir": (str, type(None)),
    "output_dir": (str, type(None)),  # hydra.runtime.output_dir: only the job knows it
}


class JobFileError(QtlUserError, RuntimeError):
    """A job or result file that is not what this launcher wrote for this job."""


def new_key() -> bytes:
    """A fresh signing key for one sweep: 32 random bytes."""
    return os.urandom(32)


def _canonical(kind: str, body: dict[str, Any]) -> bytes:
    doc = {"format": kind, "version": VERSION, "body": body}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _sign(key: bytes, kind: str, body: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(kind, body), hashlib.sha256).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, readable by this user only (a config may hold secrets)."""
    atomic_write_bytes(path, data, mode=0o600)


def write_signed(path: Path, kind: str, body: dict[str, Any], key: bytes) -> None:
    doc = {"format": kind, "version": VERSION, "body": body, "hmac": _sign(key, kind, body)}
    write_private(path, (json.dumps(doc, indent=1) + "\n").encode())


def _check_fields(path: Path, body: dict[str, Any], fields: dict[str, Any]) -> None:
    for name, kind in fields.items():
        if name not in body:
            raise JobFileError(f"{path}: field 'body.{name}' is missing")
        if kind is not None and not isinstance(body[name], kind):
            want = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise JobFileError(
                f"{path}: field 'body.{name}' must be {want}, found {type(body[name]).__name__}"
            )
    extra = sorted(set(body) - set(fields))
    if extra:
        raise JobFileError(f"{path}: unexpected field(s) {extra}")


def read_signed(path: Path, kind: str, key: bytes, fields: dict[str, Any]) -> dict[str, Any]:
    """The body of a file written by :func:`write_signed` with ``key``; else JobFileError."""
    what = "job" if kind == JOB else "result"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise JobFileError(f"cannot read the gpu_pool {what} file {path}: {err}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise JobFileError(
            f"{path} is not a gpu_pool {what} file: not JSON ({type(err).__name__}: {err}). "
            "These files are JSON written by the launcher; a pickled or foreign file is "
            "never loaded."
        ) from None
    if not isinstance(doc, dict) or set(doc) != {"format", "version", "body", "hmac"}:
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise JobFileError(
            f"{path} is not a gpu_pool {what} file: expected an object with keys "
            f"['body', 'format', 'hmac', 'version'], found {found}"
        )
    if doc["format"] != kind or doc["version"] != VERSION:
        raise JobFileError(
            f"{path}: expected format {kind!r} version {VERSION}, found "
            f"{doc['format']!r} version {doc['version']!r}"
        )
    body = doc["body"]
    if not isinstance(body, dict):
        raise JobFileError(f"{path}: 'body' must be an object, found {type(body).__name__}")
    if not isinstance(doc["hmac"], str) or not hmac.compare_digest(
        doc["hmac"], _sign(key, kind, body)
    ):
        raise JobFileError(
            f"{path} was not written for this job by the sweep's launcher (its signature does "
            "not match): refusing it"
        )
    _check_fields(path, body, fields)
    return body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
