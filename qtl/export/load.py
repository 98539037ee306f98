"""Load an export folder back into a model that predicts, with the core install only (JAX,
Flax, safetensors and qtl's model definitions; no checkpoints, optimiser or data pipeline):

    from qtl.export.load import load_export
    model = load_export("exports/cxr8-dqc-seed0")
    model.outputs                     # the probability columns
    model.preprocessing               # how images are prepared (qtl.data.images.read_image)
    probs = model.predict(images)     # uint8 images as the preprocessing makes them

Every problem with the folder (a missing or damaged file, a field the config lacks, a weight
of the wrong shape) is one :class:`ExportError` line naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import PathsConfig
from qtl.export.predictor import PredictError, Predictor, load_run, run_config

FORMAT, VERSION = "qtl-export", 1
MANIFEST = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LABELS = "labels.json"
PREPROCESSING = "preprocessing.json"
METRICS = "metrics.json"
PROVENANCE = "provenance.json"
CARD = "README.md"


class ExportError(PredictError):
    """An export folder qtl cannot load (exit 2, one line naming the file)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json(folder: Path, name: str) -> Any:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (an export folder holds {name})") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: not readable JSON ({err})") from None


def _field(data: Any, path: Path, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ExportError(f"{path}: field '{key}' is missing")
    if not isinstance(data[key], kind):
        raise ExportError(f"{path}: field '{key}' is {type(data[key]).__name__}, not {kind}")
    return data[key]


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The tensors of ``model.safetensors``; a missing or damaged file is an ExportError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing (the export's weights)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None


def load_export(folder: Path | str) -> Predictor:
    """The exported model with its weights, ready to predict (see the module doc)."""
    import jax.numpy as jnp
    from flax import nnx

    from qtl.studies import get

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    manifest = _json(folder, MANIFEST)
    where = folder / MANIFEST
    if _field(manifest, where, "format", str) != FORMAT:
        raise ExportError(f"{where}: field 'format' is {manifest['format']!r}, not {FORMAT!r}")
    version = _field(manifest, where, "version", int)
    if version > VERSION:
        raise ExportError(f"{where}: format version {version}; this qtl reads up to {VERSION}")
    study_name = _field(manifest, where, "study", str)
    cfg = run_config(_json(folder, CONFIG), str(folder / CONFIG))
    # the backbone is in the weights file, frozen or not: nothing to fetch or pretrain
    cfg.features.cache = False
    predictable = get(study_name).predictable(cfg)
    preprocessing = _json(folder, PREPROCESSING)
    _field(preprocessing, folder / PREPROCESSING, "kind", str)
    labels = _json(folder, LABELS)
    outputs = _field(labels, folder / LABELS, "outputs", list)
    if outputs != predictable.outputs:
        raise ExportError(
            f"{folder / LABELS}: field 'outputs' lists {len(outputs)} columns, the model of "
            f"{CONFIG} has {len(predictable.outputs)} ({', '.join(predictable.outputs)})"
        )
    weights_path = folder / WEIGHTS
    tensors = read_weights(weights_path)
    expected = _field(manifest, where, "weights_sha256", str)
    if sha256(weights_path) != expected:
        raise ExportError(f"{weights_path}: sha256 differs from {MANIFEST}'s (a changed file)")
    model = predictable.model
    state = nnx.state(model, nnx.Not(nnx.RngState))
    flat = nnx.to_flat_state(state)
    names = set()
    for path, var in flat:
        name = ".".join(str(k) for k in path)
        names.add(name)
        if name not in tensors:
            raise ExportError(f"{weights_path}: tensor '{name}' is missing")
        value = tensors[name]
        if value.shape != np.shape(var.get_value()):
            raise ExportError(
                f"{weights_path}: tensor '{name}' has shape {value.shape}, the model of "
                f"{CONFIG} needs {np.shape(var.get_value())}"
            )
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    extra = sorted(set(tensors) - names)
    if extra:
        raise ExportError(
            f"{weights_path}: {len(extra)} tensor(s) the model of {CONFIG} does not have "
            f"(e.g. '{extra[0]}')"
        )
    nnx.update(model, nnx.from_flat_state(flat))
    provenance = _json(folder, PROVENANCE) if (folder / PROVENANCE).exists() else {}
    return Predictor(
        model=model,
        objective=predictable.objective,
        outputs=outputs,
        descriptions=list(labels.get("descriptions", outputs)),
        preprocessing=preprocessing,
        task=str(labels.get("task", predictable.task)),
        source={
            "kind": "export",
            "folder": str(folder),
            "study": study_name,
            "run": provenance.get("run"),
            "data_source": manifest.get("data_source"),
        },
    )


def open_model(folder: Path | str, paths: PathsConfig | None = None) -> Predictor:
    """An export folder (it has export.json) or a finished run folder (its best checkpoint)."""
    folder = Path(folder).expanduser()
    if (folder / MANIFEST).exists():
        return load_export(folder)
    return load_run(folder, paths)
