"""Which records a run uses: the configured dataset, read by the real-format readers.

``data=synthetic`` first writes (once) a synthetic dataset in the NIH-CXR-LT / MIMIC-CXR-LT
on-disk formats and then reads it exactly as real data would be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qtl.config import DataConfig, DataName, PathsConfig
from qtl.data.mimic import read_mimic
from qtl.data.nih import NO_DATA_HINT, read_nih_split
from qtl.data.records import DataError, Split
from qtl.data.synthetic import MIMIC_CSV, MIMIC_DIR, generate, spec, spec_hash


def synthetic_root(cfg: DataConfig, data_dir: Path | None = None) -> Path:
    """``data.root`` or a folder under ``data_dir`` (``paths.data_dir``) keyed by the
    generator settings, shared by all runs."""
    if cfg.root:
        return Path(cfg.root)
    params = spec(
        sizes=dict(cfg.synth_sizes),
        image_px=cfg.synth_image_px,
        seed=cfg.synth_seed,
        difficulty=cfg.synth_difficulty,
    )
    base = data_dir if data_dir is not None else Path(PathsConfig.data_dir)
    return Path(base) / f"synthetic-{spec_hash(params)}"


def load_splits(
    cfg: DataConfig,
    labels: Sequence[str],
    *,
    progress: bool = False,
    check_files: bool = True,
    data_dir: Path | None = None,
) -> dict[str, Split]:
    """train / val / test (and external when configured), in the order of ``labels``.

    ``check_files=False``: missing images are left to the image cache (see ``read_nih_split``).
    ``data_dir``: where a synthetic set without ``data.root`` is written (``paths.data_dir``).
    """
    if cfg.name == DataName.synthetic:
        root = generate(
            synthetic_root(cfg, data_dir),
            sizes=dict(cfg.synth_sizes),
            image_px=cfg.synth_image_px,
            seed=cfg.synth_seed,
            difficulty=cfg.synth_difficulty,
            progress=progress,
        )
        image_dir = None
        external_csv: Path | None = root / MIMIC_DIR / MIMIC_CSV
        external_root: Path | None = root / MIMIC_DIR
        if not external_csv.exists():
            external_csv = external_root = None
    else:
        if not cfg.root:
            raise DataError(f"data.root is not set (data={cfg.name}). {NO_DATA_HINT}")
        root = Path(cfg.root)
        image_dir = Path(cfg.image_dir) if cfg.image_dir else None
        external_csv = Path(cfg.external_csv) if cfg.external_csv else None
        external_root = Path(cfg.external_root) if cfg.external_root else None
        if external_csv is not None and external_root is None:
            raise DataError(
                f"data.external_csv={external_csv} is set but data.external_root is not: set it "
                "to the MIMIC-CXR-JPG folder that the CSV's `path` column is relative to."
            )
    splits = {
        name: read_nih_split(root, name, labels, image_dir, check_files=check_files).head(cfg.limit)
        for name in ("train", "val", "test")
    }
    if external_csv is not None and external_root is not None:
        splits["external"] = read_mimic(
            external_csv, external_root, labels, check_files=check_files
        ).head(cfg.limit)
    return splits
