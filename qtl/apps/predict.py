"""``mode=predict``: a trained model's probabilities for a folder or CSV list of images.

``predict.run_dir`` is a finished run (its best checkpoint) or an export folder; the images
are prepared as the run trained (its recorded preprocessing), scored in batches with a
progress bar, and written one row per image to a CSV: ``image``, ``prob_<output>`` per label
or class, ``error``. An image that cannot be read gets an empty row with the reason in
``error`` and is listed at the end; it does not stop the others.
"""

from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import ConfigError, QtlConfig


def predict_files(
    predictor: Any, files: list[Path], batch_size: int, *, progress: bool = False, workers: int = 0
) -> tuple[np.ndarray, list[str]]:
    """(probabilities (N, outputs), error per file: "" when read), in the order of ``files``;
    unreadable files' rows are NaN."""
    import os

    from qtl.data.images import read_image
    from qtl.data.records import DataError
    from qtl.progress import bar

    spec = predictor.preprocessing
    probs = np.full((len(files), len(predictor.outputs)), np.nan, np.float32)
    errors = [""] * len(files)

    def read(i: int) -> tuple[int, np.ndarray | None]:
        try:
            return i, read_image(files[i], spec)
        except DataError as err:
            errors[i] = str(err)
            return i, None

    with (
        ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
        bar(total=len(files), desc="predict", enabled=progress, unit="img") as pbar,
    ):
        for start in range(0, len(files), batch_size):
            got = [x for x in pool.map(read, range(start, min(start + batch_size, len(files))))]
            ok = [(i, a) for i, a in got if a is not None]
            if ok:
                rows = predictor.predict(np.stack([a for _, a in ok]), batch_size)
                for (i, _), row in zip(ok, rows, strict=True):
                    probs[i] = row
            pbar.update(len(got))
    return probs, errors


def write_csv(path: Path, files: list[Path], outputs: list[str], probs: np.ndarray,
              errors: list[str]) -> None:  # fmt: skip
    """One row per image: its path, a probability per output (empty when unreadable), error."""
    from qtl.utils.files import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", *(f"prob_{o}" for o in outputs), "error"])
    for f, row, err in zip(files, probs, errors, strict=True):
        cells = ["" if err else f"{p:.6f}" for p in row]
        writer.writerow([str(f), *cells, err])
    from qtl.export.write import readable_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue(), mode=readable_mode())


def main(cfg: QtlConfig, run_dir: Path | None = None) -> dict[str, Any]:
    from qtl.data.images import list_images
    from qtl.data.records import DataError
    from qtl.export.load import open_model
    from qtl.progress import want_progress

    p = cfg.predict
    if not p.run_dir or not p.images:
        missing = "predict.run_dir" if not p.run_dir else "predict.images"
        raise ConfigError(
            f"{missing} is not set: mode=predict needs a finished run (or export) folder and "
            "the images, e.g. python launch.py mode=predict "
            "predict.run_dir=outputs/demo/cxr8-dqc/seed0 predict.images=<folder or CSV>"
        )
    if p.batch_size <= 0:
        raise ConfigError(f"predict.batch_size={p.batch_size} must be positive.")
    if p.out:
        out = Path(p.out)
    elif run_dir is not None:
        out = Path(run_dir) / "predictions.csv"
    else:
        raise ConfigError("predict.out is not set: name the CSV to write")
    files = list_images(p.images)
    if not files:
        raise DataError(f"predict.images={p.images}: no PNG, JPEG or DICOM files there")
    predictor = open_model(p.run_dir, cfg.paths)
    show = want_progress(cfg.progress)
    probs, errors = predict_files(predictor, files, p.batch_size, progress=show)
    write_csv(out, files, predictor.outputs, probs, errors)
    bad = [(f, e) for f, e in zip(files, errors, strict=True) if e]
    mark = " (a model trained on synthetic data)" if predictor.synthetic else ""
    print(
        f"[qtl] predict: {len(files) - len(bad)} of {len(files)} image(s) scored by "
        f"{p.run_dir}{mark} -> {out}"
    )
    if bad:
        print(f"[qtl] {len(bad)} image(s) could not be read (empty rows, reason in 'error'):")
        for _, e in bad[:20]:
            print(f"  {e}")
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more (see {out})")
    return {"out": str(out), "images": len(files), "unreadable": len(bad)}
