"""Reader for the NIH-CXR-LT label files (training and internal test data of the study).

The CSV helpers here are shared with the MIMIC reader so that both formats fail with the
same kind of message: which file, which row/column, what was expected.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qtl.data.records import DataError, Split
from qtl.labels import ALL_LABELS

SPLITS = ("train", "val", "test")
LABEL_FILE = "miccai2023_nih-cxr-lt_labels_{split}.csv"
# where the real files come from (the README's Data section has the details)
NO_DATA_HINT = (
    "The NIH-CXR-LT label CSVs come from the CXR-LT challenge (Holste et al.), the PNGs from "
    "NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC); see the README's Data "
    "section. Use data=synthetic to try qtl without data."
)
MIMIC_HINT = (
    "MIMIC-CXR-JPG and the CXR-LT 2023 MIMIC labels are on PhysioNet (credentialed access: "
    "https://physionet.org/content/mimic-cxr-jpg/); see the README's Data section. Leave "
    "data.external_csv unset to run without the external test, or use data=synthetic to try "
    "qtl without data."
)
_MAX_LISTED = 5
# NIH-CXR-LT cells are written as 0/1; "0.0"/"1.0" appear when a file went through pandas.
_BINARY = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}


def label_file(root: Path, split: str) -> Path:
    """Where NIH-CXR-LT keeps the labels of ``split``."""
    return Path(root) / LABEL_FILE.format(split=split)


def open_rows(
    path: Path, what: str, hint: str = NO_DATA_HINT
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header and a stream of (line number, cells) of a CSV; ``what`` names it in errors.

    Streaming keeps only the selected cells in memory (the train file has 78k rows).
    """
    if not path.is_file():
        raise DataError(
            f"{what} not found: expected the file {path}"
            f"{'' if path.parent.is_dir() else f' (the folder {path.parent} does not exist)'}. "
            f"{hint}"
        )
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{what} {path} cannot be opened: {err}.") from None
    reader = csv.reader(handle)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        handle.close()
        raise DataError(f"{what} {path} is empty (no header row).") from None
    except (csv.Error, UnicodeDecodeError) as err:
        handle.close()
        raise DataError(f"{what} {path} is not a readable CSV file: {err}.") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        with handle:
            try:
                for cells in reader:
                    if not cells:  # blank line
                        continue
                    if len(cells) != len(header):
                        raise DataError(
                            f"{path}, line {reader.line_num}: {len(cells)} cells but the "
                            f"header has {len(header)} columns."
                        )
                    yield reader.line_num, cells
            except (csv.Error, UnicodeDecodeError) as err:
                raise DataError(
                    f"{path}, line {reader.line_num}: not a readable CSV row: {err}."
                ) from None

    return header, rows()


def column_index(path: Path, header: Sequence[str], needed: Sequence[str]) -> list[int]:
    """Position of each needed column, or a DataError listing what is missing and found."""
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; columns found: {list(header)}.")
    return [header.index(name) for name in needed]


def check_labels(labels: Sequence[str]) -> None:
    """Reject label names qtl does not know before any file is opened."""
    unknown = [name for name in labels if name not in ALL_LABELS]
    if unknown:
        raise DataError(
            f"unknown label(s) {unknown}; NIH-CXR-LT labels are: {', '.join(ALL_LABELS)}."
        )
    if not labels:
        raise DataError("no labels requested; pass at least one NIH-CXR-LT label.")


def check_images(paths: Sequence[Path], source: Path, folder: Path, setting: str) -> None:
    """Fail up front (not hours into training) when image files are missing.

    ``setting`` names the config field that points at ``folder``.
    """
    if not folder.is_dir():
        raise DataError(
            f"image folder {folder} for {source} does not exist; set {setting} to the folder "
            f"holding the images. {NO_DATA_HINT}"
        )
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        shown = ", ".join(str(p) for p in missing[:_MAX_LISTED])
        raise DataError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing from "
            f"{folder} (first: {shown}); check {setting} or the download."
        )


def read_nih_split(
    root: Path,
    split: str,
    labels: Sequence[str],
    image_dir: Path | None = None,
    *,
    check_files: bool = True,
) -> Split:
    """One NIH-CXR-LT split with the label columns in the order of ``labels``.

    ``check_files=False`` leaves missing images to the image cache, which may hold them
    already (the warm path never needs the originals) or reports them per ``on_bad_image``.
    """
    if split not in SPLITS:
        raise DataError(f"NIH-CXR-LT split '{split}' does not exist; use one of {SPLITS}.")
    check_labels(labels)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"NIH-CXR-LT root {root} does not exist; it should hold "
            f"{LABEL_FILE.format(split=split)}. {NO_DATA_HINT}"
        )
    path = label_file(root, split)
    header, rows = open_rows(path, f"NIH-CXR-LT {split} label file")
    id_col, *label_cols = column_index(path, header, ["id", *labels])
    ids: list[str] = []
    values: list[list[float]] = []
    for line, cells in rows:
        row = []
        for name, col in zip(labels, label_cols, strict=True):
            value = _BINARY.get(cells[col].strip())
            if value is None:
                raise DataError(
                    f"{path}, line {line}, column '{name}': value {cells[col]!r} is not 0 or 1."
                )
            row.append(value)
        ids.append(cells[id_col].strip())
        values.append(row)
    if not ids:
        raise DataError(f"{path} has a header but no rows.")
    folder = Path(image_dir).expanduser() if image_dir is not None else root / "images"
    paths = tuple(folder / name for name in ids)
    if check_files:
        check_images(paths, path, folder, "data.image_dir")
    return Split(
        name=split,
        ids=tuple(ids),
        paths=paths,
        labels=np.asarray(values, dtype=np.float32).reshape(len(ids), len(labels)),
        label_names=tuple(labels),
        source=path,
    )
