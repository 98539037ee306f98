"""Reader for the MIMIC-CXR-LT test labels: the study's external test set (frontal only).

Label cells: a label counts as present only when its cell is a positive 1 ("1", "1.0").
Empty cells, 0, -1 (uncertain in CheXpert-style labelling) and anything else count as
absent. That is the convention of the CXR-LT label files (uncertain findings were mapped
to negative) and keeps the external set binary like NIH-CXR-LT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qtl.data.nih import MIMIC_HINT, check_images, check_labels, column_index, open_rows
from qtl.data.records import DataError, Split
from qtl.labels import MIMIC_NAMES

FRONTAL_VIEWS = frozenset({"AP", "PA"})
_POSITIVE = {"1", "1.0", "1.00"}


def mimic_column(label: str, header: Sequence[str]) -> str:
    """MIMIC spelling of an NIH label (``Effusion`` -> ``Pleural Effusion``).

    Falls back to the NIH spelling when a file already uses it.
    """
    name = MIMIC_NAMES.get(label, label)
    return label if name not in header and label in header else name


def _is_positive(cell: str) -> bool:
    cell = cell.strip()
    if cell in _POSITIVE:
        return True
    try:
        return float(cell) == 1.0
    except ValueError:
        return False


def read_mimic(csv: Path, root: Path, labels: Sequence[str], *, check_files: bool = True) -> Split:
    """Frontal (AP/PA) images of a MIMIC-CXR-LT label file, labels in the order of ``labels``.

    ``root`` is the MIMIC-CXR-JPG folder that the ``path`` column is relative to.
    """
    check_labels(labels)
    csv, root = Path(csv).expanduser(), Path(root).expanduser()
    header, rows = open_rows(csv, "MIMIC-CXR-LT label file", MIMIC_HINT)
    names = [mimic_column(label, header) for label in labels]
    id_col, path_col, view_col, *label_cols = column_index(
        csv, header, ["dicom_id", "path", "ViewPosition", *names]
    )
    if not root.is_dir():
        raise DataError(
            f"MIMIC-CXR-JPG root {root} does not exist; set data.external_root to the folder "
            f"that the 'path' column of {csv} is relative to. {MIMIC_HINT}"
        )
    ids: list[str] = []
    paths: list[Path] = []
    values: list[list[float]] = []
    n_rows = 0
    for _, cells in rows:
        n_rows += 1
        if cells[view_col].strip().upper() not in FRONTAL_VIEWS:
            continue
        ids.append(cells[id_col].strip())
        paths.append(root / cells[path_col].strip())
        values.append([1.0 if _is_positive(cells[col]) else 0.0 for col in label_cols])
    if not ids:
        raise DataError(
            f"{csv} has no frontal images: none of its {n_rows} rows has ViewPosition "
            f"in {sorted(FRONTAL_VIEWS)}."
        )
    if check_files:
        check_images(paths, csv, root, "data.external_root")
    return Split(
        name="external",
        ids=tuple(ids),
        paths=tuple(paths),
        labels=np.asarray(values, dtype=np.float32).reshape(len(ids), len(labels)),
        label_names=tuple(labels),
        source=csv,
    )
