"""What MedMNIST's 2D sets are: task type, channels, classes, split sizes, label names.

Facts from the ``medmnist`` package's ``INFO`` table (v3.0.2), so qtl can check
a file and build a model without that package (which downloads at run time and pulls
torchvision). The reader, the synthetic generator, the losses and the metrics all key off
:class:`Task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Task(StrEnum):
    """MedMNIST's task types (its own strings are in :data:`MEDMNIST_TASK`)."""

    multi_class = "multi-class"
    binary = "binary"
    multi_label = "multi-label"
    ordinal = "ordinal"


# the strings medmnist's INFO and Evaluator use
MEDMNIST_TASK = {
    Task.multi_class: "multi-class",
    Task.binary: "binary-class",
    Task.multi_label: "multi-label, binary-class",
    Task.ordinal: "ordinal-regression",
}

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FlagInfo:
    """One MedMNIST 2D set."""

    flag: str
    task: Task
    channels: int  # 1: images N x H x W; 3: N x H x W x 3
    splits: dict[str, int]  # official split sizes
    labels: tuple[str, ...]  # class names (multi-class/binary/ordinal) or label names

    @property
    def n_classes(self) -> int:
        """Classes (multi-class, binary, ordinal) or labels (multi-label)."""
        return len(self.labels)

    @property
    def label_columns(self) -> int:
        """Columns of the ``*_labels`` arrays: one class index, or one 0/1 per label."""
        return self.n_classes if self.task == Task.multi_label else 1


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)


def _info(flag: str, task: Task, channels: int, sizes: tuple[int, int, int], labels) -> FlagInfo:
    return FlagInfo(flag, task, channels, dict(zip(SPLITS, sizes, strict=True)), tuple(labels))


INFO: dict[str, FlagInfo] = {
    i.flag: i
    for i in (
        _info(
            "pathmnist",
            Task.multi_class,
            3,
            (89996, 10004, 7180),
            (
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),
        ),
        _info(
            "chestmnist",
            Task.multi_label,
            1,
            (78468, 11219, 22433),
            (
                "atelectasis",
                "cardiomegaly",
                "effusion",
                "infiltration",
                "mass",
                "nodule",
                "pneumonia",
                "pneumothorax",
                "consolidation",
                "edema",
                "emphysema",
                "fibrosis",
                "pleural",
                "hernia",
            ),
        ),
        _info(
            "dermamnist",
            Task.multi_class,
            3,
            (7007, 1003, 2005),
            (
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ),
        ),
        _info(
            "octmnist",
            Task.multi_class,
            1,
            (97477, 10832, 1000),
            ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        ),
        _info("pneumoniamnist", Task.binary, 1, (4708, 524, 624), ("normal", "pneumonia")),
        _info("retinamnist", Task.ordinal, 3, (1080, 120, 400), ("0", "1", "2", "3", "4")),
        _info("breastmnist", Task.binary, 1, (546, 78, 156), ("malignant", "normal, benign")),
        _info(
            "bloodmnist",
            Task.multi_class,
            3,
            (11959, 1712, 3421),
            (
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ),
        ),
        _info(
            "tissuemnist",
            Task.multi_class,
            1,
            (165466, 23640, 47280),
            (
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ),
        ),
        _info("organamnist", Task.multi_class, 1, (34561, 6491, 17778), _ORGANS),
        _info("organcmnist", Task.multi_class, 1, (12975, 2392, 8216), _ORGANS),
        _info("organsmnist", Task.multi_class, 1, (13932, 2452, 8827), _ORGANS),
    )
}

FLAGS = tuple(INFO)


def flag_info(flag: str) -> FlagInfo:
    """The INFO entry of ``flag``, with an error that lists the valid ones."""
    try:
        return INFO[flag]
    except KeyError:
        raise ValueError(
            f"data.flag='{flag}' is not a MedMNIST 2D set; expected one of: {', '.join(FLAGS)}"
        ) from None


def file_name(flag: str, size: int) -> str:
    """``{flag}.npz`` at 28 px, ``{flag}_{size}.npz`` at 64/128/224 (MedMNIST's naming)."""
    if size not in SIZES:
        raise ValueError(
            f"data.size={size} is not a MedMNIST size; expected one of: "
            f"{', '.join(map(str, SIZES))}"
        )
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


SYNTHETIC_KEY = "qtl_synthetic"  # npz key marking a file written by qtl's generator


def medmnist_path(root: Path | str, flag: str, size: int = 28) -> Path:
    """Where ``flag`` at ``size`` lives under ``root`` (MedMNIST's file names)."""
    return Path(root) / file_name(flag_info(flag).flag, size)
