"""``mode=export``: a finished run -> a folder another person can load without qtl's training
code (weights as safetensors, config, labels, preprocessing, metrics, provenance, model card;
:mod:`qtl.export.write`)."""

from __future__ import annotations

from pathlib import Path

from qtl.config import ConfigError, QtlConfig


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Path:
    from qtl.export.write import write_export

    if not cfg.export.run_dir:
        raise ConfigError(
            "export.run_dir is not set: mode=export needs a finished run folder, e.g. "
            "python launch.py mode=export export.run_dir=outputs/demo/cxr8-dqc/seed0 "
            "export.out=exports/cxr8-dqc"
        )
    if cfg.export.out:
        out = Path(cfg.export.out)
    elif run_dir is not None:
        out = Path(run_dir) / "model"
    else:
        raise ConfigError("export.out is not set: name the export folder to write")
    folder = write_export(cfg.export.run_dir, out, cfg.paths)
    print(f"[qtl] exported {cfg.export.run_dir} -> {folder} (model card: {folder / 'README.md'})")
    return folder
