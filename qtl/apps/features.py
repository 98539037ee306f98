"""``mode=features``: fill the frozen backbone's feature cache for the run's splits ahead of
training, with a progress bar (a sweep's runs then only read it; a training run would fill
whatever is missing itself).

    python launch.py mode=features experiment=frozen task=cxr19
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig, validate, validate_features


def main(cfg: QtlConfig, run_dir: Path | None = None) -> dict[str, Any]:
    from qtl.data.source import load_splits
    from qtl.models.classifier import build_model
    from qtl.progress import want_progress
    from qtl.studies import study_for
    from qtl.studies.pretrain import resolve_weights
    from qtl.train.features import feature_sets
    from qtl.utils import paths

    validate(cfg)
    validate_features(cfg, needed=True)  # fails before any weights or images are loaded
    show = want_progress(cfg.progress)
    model = build_model(cfg, cfg.seed, weights=resolve_weights(cfg, study_for(cfg)))
    splits = load_splits(
        cfg.data,
        list(cfg.task.labels),
        progress=show,
        check_files=False,
        data_dir=paths.data_dir(cfg.paths),
    )
    sets = feature_sets(cfg, model.backbone, splits, progress=show)
    summary: dict[str, Any] = {}
    for name, fs in sets.items():
        rows = len(fs.features)
        summary[name] = {
            "directory": str(fs.directory),
            "rows": rows,
            "computed": fs.computed,
            "cached": fs.cached,
            "skipped": len(fs.bad),
            "stored_bytes": fs.stored_bytes,
            "bytes_per_image": round(fs.stored_bytes / max(rows, 1), 1),
        }
        print(
            f"[qtl] features {name}: {rows} vectors of {fs.features.shape[1]} "
            f"({fs.features.dtype}), {fs.computed} computed now, {fs.cached} were cached; "
            f"{fs.stored_bytes / max(rows, 1):.0f} bytes/image in {fs.directory}"
        )
    return summary
