"""Label sets of the study and the NIH-CXR-LT / MIMIC-CXR-LT label statistics (Table II).

The order of each list is the column order of every output (logits, AUROC tables).
"""

from __future__ import annotations

CXR8: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)
CXR14: tuple[str, ...] = CXR8 + (
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural Thickening",
    "Hernia",
)
CXR19: tuple[str, ...] = CXR14 + (
    "Calcification of the Aorta",
    "Pneumomediastinum",
    "Pneumoperitoneum",
    "Subcutaneous Emphysema",
    "Tortuous Aorta",
)
TASKS: dict[str, tuple[str, ...]] = {"cxr8": CXR8, "cxr14": CXR14, "cxr19": CXR19}
ALL_LABELS: tuple[str, ...] = CXR19

# NIH label name -> MIMIC-CXR-LT column name where they differ.
MIMIC_NAMES: dict[str, str] = {"Effusion": "Pleural Effusion"}

# Table II of the study: NIH-CXR-LT train / val / test counts and the MIMIC-CXR-LT
# (frontal, test) count per label.
NIH_SPLIT_SIZES: dict[str, int] = {"train": 78605, "val": 12535, "test": 21081}
MIMIC_TEST_SIZE = 48860
LABEL_COUNTS: dict[str, dict[str, int]] = {
    "Infiltration": {"train": 12739, "val": 1996, "test": 5159, "mimic": 1781},
    "Effusion": {"train": 7919, "val": 1663, "test": 3735, "mimic": 14586},
    "Atelectasis": {"train": 7587, "val": 1272, "test": 2700, "mimic": 14014},
    "Nodule": {"train": 4359, "val": 667, "test": 1305, "mimic": 1309},
    "Mass": {"train": 3689, "val": 764, "test": 1329, "mimic": 1006},
    "Pneumothorax": {"train": 2432, "val": 764, "test": 2106, "mimic": 3282},
    "Consolidation": {"train": 2626, "val": 544, "test": 1497, "mimic": 3232},
    "Pleural Thickening": {"train": 1998, "val": 485, "test": 902, "mimic": 590},
    "Cardiomegaly": {"train": 1590, "val": 318, "test": 868, "mimic": 14703},
    "Emphysema": {"train": 1327, "val": 272, "test": 917, "mimic": 649},
    "Edema": {"train": 1283, "val": 269, "test": 751, "mimic": 8444},
    "Subcutaneous Emphysema": {"train": 957, "val": 221, "test": 813, "mimic": 572},
    "Fibrosis": {"train": 1138, "val": 183, "test": 365, "mimic": 271},
    "Pneumonia": {"train": 806, "val": 173, "test": 452, "mimic": 8242},
    "Tortuous Aorta": {"train": 598, "val": 49, "test": 95, "mimic": 547},
    "Calcification of the Aorta": {"train": 368, "val": 32, "test": 55, "mimic": 704},
    "Pneumoperitoneum": {"train": 214, "val": 33, "test": 69, "mimic": 136},
    "Pneumomediastinum": {"train": 88, "val": 22, "test": 143, "mimic": 176},
    "Hernia": {"train": 130, "val": 35, "test": 62, "mimic": 739},
}


def prevalence(label: str, split: str = "train") -> float:
    """Fraction of images of a split carrying ``label`` (split: train|val|test|mimic)."""
    total = MIMIC_TEST_SIZE if split == "mimic" else NIH_SPLIT_SIZES[split]
    return LABEL_COUNTS[label][split] / total


def by_train_frequency(labels: tuple[str, ...] | list[str]) -> list[str]:
    """Labels sorted from most to least frequent in NIH-CXR-LT train (report order)."""
    return sorted(labels, key=lambda name: -LABEL_COUNTS[name]["train"])
