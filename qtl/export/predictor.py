"""A trained model ready to score images: built by the run's study (``Study.predictable``)
with the weights of a run's best checkpoint (:func:`load_run`) or of an export folder
(:func:`qtl.export.load.load_export`); :meth:`Predictor.predict` is one jitted forward pass
per fixed-size batch (the last one padded, so it compiles once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import PathsConfig, QtlConfig
from qtl.utils.errors import QtlUserError


class PredictError(QtlUserError, ValueError):
    """A folder that is not a finished run or a readable export (exit 2, one line)."""


@dataclass
class Predictor:
    """A model with its weights, how to prepare its images and what its outputs are."""

    model: Any
    objective: Any
    outputs: list[str]
    descriptions: list[str]
    preprocessing: dict[str, Any]
    task: str
    source: dict[str, Any] = field(default_factory=dict)  # study, run, data_source, folder
    _forward: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.model.eval()  # dropout off, batch norm on its running statistics
        graph, state = nnx.split(self.model)
        objective = self.objective

        @jax.jit
        def forward(state: Any, images_u8: jax.Array) -> jax.Array:
            module = nnx.merge(graph, state, copy=True)
            return objective.scores(module(objective.normalize(images_u8.astype(jnp.float32))))

        self._state = state
        self._forward = forward

    @property
    def synthetic(self) -> bool:
        return self.source.get("data_source") == "synthetic"

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities (N, len(outputs)) of uint8 images shaped as the preprocessing
        makes them: (N, C, C) gray for the CXR study, (N, S, S, channels) for MedMNIST."""
        images = np.asarray(images, np.uint8)
        out = np.zeros((len(images), len(self.outputs)), np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            real = len(chunk)
            if real < batch_size:  # same compiled shape for the last batch
                pad = np.zeros((batch_size - real, *chunk.shape[1:]), np.uint8)
                chunk = np.concatenate([chunk, pad])
            out[start : start + real] = np.asarray(self._forward(self._state, chunk))[:real]
        return out

    def weights(self) -> dict[str, np.ndarray]:
        """Every weight and statistic by its flattened module path (RNG streams left out:
        they only drive dropout in training)."""
        from flax import nnx

        flat = nnx.to_flat_state(nnx.state(self.model, nnx.Not(nnx.RngState)))
        return {
            ".".join(str(k) for k in path): np.ascontiguousarray(np.asarray(var.get_value()))
            for path, var in flat
        }


def run_config(config: Any, where: str) -> QtlConfig:
    """A recorded config (results.json, an export's config.json) as the typed schema; keys
    this qtl does not know are left out, a missing or bad field is a one-line error."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from qtl.config import to_schema

    if not isinstance(config, dict):
        raise PredictError(f"{where}: the config is not a JSON object")
    known = {f.name for f in dataclasses.fields(QtlConfig)}
    try:
        return to_schema(OmegaConf.create({k: v for k, v in config.items() if k in known}))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        text = " ".join(str(err).split("\n")[0].split())
        raise PredictError(f"{where}: field '{key}': {text}") from None


def finished_run(run_dir: Path | str) -> Any:
    """The run's results.json (a finished run), or a one-line error saying what is there."""
    from qtl.record.files import RunFiles

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir}: no such folder (expected a finished run or an export)")
    files = RunFiles(run_dir, create=False)
    results = files.read_results()
    if results is None:
        state = files.status()
        raise PredictError(
            f"{run_dir}: not a finished run (no results.json; the run is {state}) and not an "
            "export folder (no export.json): point at a run folder that finished training, "
            "e.g. outputs/<name>/<label>/seed<n>"
        )
    return results


def load_run(run_dir: Path | str, paths: PathsConfig | None = None) -> Predictor:
    """The model of a finished run with the weights of its best checkpoint."""
    from flax import nnx

    from qtl.studies import get
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.step import init_state, make_optimizer

    run_dir = Path(run_dir).expanduser()
    results = finished_run(run_dir)
    cfg = run_config(results.config, str(run_dir / "results.json"))
    if paths is not None:
        cfg.paths = paths  # where this machine keeps the caches (a frozen backbone's weights)
    study = get(results.study)
    p = study.predictable(cfg)
    best = run_dir / "checkpoints" / "best" / str(results.best_epoch)
    if not best.is_dir():
        raise PredictError(
            f"{run_dir}: results.json names best epoch {results.best_epoch}, but {best} is "
            "missing (the checkpoints were moved or deleted)"
        )
    tx = make_optimizer(cfg.train)
    if cfg.features.cache:  # the checkpoint holds the head; the backbone is the frozen start
        from qtl.models.hf_import import load_pretrained
        from qtl.train.features import init_feature_state

        if p.backbone_weights:
            load_pretrained(p.model.backbone, p.backbone_weights)
        target, template = p.model.head, init_feature_state(p.model.head, tx)
    else:
        target, template = p.model, init_state(p.model, cfg, tx)
    ckpts = Checkpoints(run_dir / "checkpoints")
    try:
        state, _ = ckpts.restore("best", template, step=results.best_epoch)
    finally:
        ckpts.close()
    nnx.update(target, state.params, state.rest)
    return Predictor(
        model=p.model,
        objective=p.objective,
        outputs=p.outputs,
        descriptions=p.descriptions,
        preprocessing=p.preprocessing,
        task=p.task,
        source={
            "kind": "run",
            "folder": str(run_dir),
            "study": results.study,
            "run": results.run,
            "label": results.label,
            "seed": results.seed,
            "best_epoch": results.best_epoch,
            "data_source": "synthetic" if results.synthetic else "real",
        },
    )
