"""A finished MedMNIST run as a distillation teacher: its best checkpoint's logits on every
split, computed once and cached under a key of the checkpoint's bytes and the data.

Caching by the checkpoint's own hash (not by the teacher's config) means a retrained
teacher, even with the same config, never serves stale logits, and the same teacher shared
by every student seed and model is evaluated once.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import ConfigError, QtlConfig
from qtl.train.medmnist import TeacherLogits

DATA_KEYS = ("flag", "size", "synthetic", "synth_seed", "synth_sizes", "synth_noise")


def checkpoint_hash(directory: Path) -> str:
    """sha256 over the relative paths and bytes of every file of one checkpoint folder."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"{directory}: the teacher's best checkpoint holds no files")
    for p in files:
        h.update(str(p.relative_to(directory)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _data_key(cfg: QtlConfig, content: dict[str, str] | None = None) -> dict[str, Any]:
    """What data a run saw: its data settings and ``content`` (the file's digests,
    :mod:`qtl.data.content`), or its ``data.root`` for a teacher recorded before content."""
    d = cfg.data
    out = {k: getattr(d, k) for k in DATA_KEYS}
    out["synth_sizes"] = {k: int(v) for k, v in sorted(d.synth_sizes.items())}
    out["binary_logits"] = int(d.binary_logits)
    if content is None:
        out["root"] = d.root
    else:
        out["content"] = dict(sorted(content.items()))
    return out


def _recorded_content(run_dir: Path) -> dict[str, str] | None:
    """The data content a finished run recorded (run_config.json), None before records had it."""
    from qtl.record.identity import CONTENT, read_record

    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        return None
    ident = read_record(path).get("identity", {})
    content = {k[len(CONTENT) :]: v for k, v in ident.items() if k.startswith(CONTENT)}
    return content or None


def _data_keys(student: QtlConfig, teacher: QtlConfig, run_dir: Path) -> tuple[dict, dict]:
    """(student's, teacher's) data keys, compared by content when the teacher recorded its
    data's content (the data may have moved since), else by path as before."""
    from qtl.data.content import medmnist_digests
    from qtl.utils import paths

    recorded = _recorded_content(run_dir)
    if recorded is None:
        return _data_key(student), _data_key(teacher)
    mine = medmnist_digests(
        student.data, paths.data_dir(student.paths), paths.cache_dir(student.paths) / "content"
    )
    return _data_key(student, mine), _data_key(teacher, recorded)


def teacher_logits(
    student: QtlConfig, teacher: QtlConfig, run_dir: Path, cache_dir: Path
) -> TeacherLogits:
    """The logits of the finished run ``run_dir`` (trained with ``teacher``) on the student's
    splits: from the cache, or computed from its best checkpoint and cached."""
    from qtl.record.files import RunFiles
    from qtl.utils.files import atomic_write_bytes

    results = RunFiles(run_dir, create=False).read_results()
    if results is None:
        raise ConfigError(
            f"distill.teacher={run_dir}: no results.json there (not a finished qtl run)"
        )
    student_key, teacher_key = _data_keys(student, teacher, run_dir)
    if teacher_key != student_key:
        raise ConfigError(
            f"distill.teacher={run_dir} was trained on other data ({teacher_key}) than "
            f"the student's ({student_key}); train a teacher on the student's data."
        )
    best_dir = Path(run_dir) / "checkpoints" / "best" / str(results.best_epoch)
    sha = checkpoint_hash(best_dir)
    key = hashlib.sha256(
        json.dumps({"checkpoint": sha, "data": student_key}, sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / "teacher_logits" / f"{key}.npz"
    record = {
        "run_dir": str(run_dir),
        "model": results.model,
        "fingerprint": results.fingerprint,
        "best_epoch": results.best_epoch,
        "checkpoint_sha256": sha,
        "logits_cache": str(cache),
        "parameters": results.parameters.get("total"),
        "metrics": results.metrics,
    }
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                return TeacherLogits({k: npz[k] for k in npz.files}, record)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            warnings.warn(  # a cache: computed again from the teacher's checkpoint
                f"teacher logits cache {cache} is unreadable ({type(err).__name__}: {err}); "
                "recomputing it",
                stacklevel=2,
            )
    logits = _compute(teacher, run_dir, results.best_epoch)
    buf = io.BytesIO()
    np.savez(buf, **logits)
    atomic_write_bytes(cache, buf.getvalue())
    return TeacherLogits(logits, record)


def _compute(cfg: QtlConfig, run_dir: Path, best_epoch: int) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from qtl.data.loader import batches
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.medmnist import medmnist_inputs
    from qtl.train.step import init_state, make_steps
    from qtl.utils import paths

    inputs = medmnist_inputs(cfg, paths.data_dir(cfg.paths), None)
    steps = make_steps(inputs.model, cfg, inputs.objective)
    ckpts = Checkpoints(Path(run_dir) / "checkpoints")
    try:
        best, _ = ckpts.restore("best", init_state(inputs.model, cfg, steps.tx), step=best_epoch)
    finally:
        ckpts.close()
    objective = inputs.objective

    @jax.jit
    def forward(state, images_u8):
        module = nnx.merge(steps.eval_graph, state.params, state.rest, copy=True)
        return module(objective.normalize(images_u8.astype(jax.numpy.float32)))

    out = {}
    for split, (images, y) in inputs.arrays.items():
        rows = []
        for b in batches(images, y, cfg.train.eval_batch_size):
            rows.append(np.asarray(forward(best, b.images))[: int(b.mask.sum())])
        out[split] = np.concatenate(rows).astype(np.float32)
    return out
