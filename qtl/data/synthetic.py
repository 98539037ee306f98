"""Synthetic CXR-LT: a small, learnable stand-in for NIH-CXR-LT + MIMIC-CXR-LT.

It is written in exactly the on-disk formats of the real data so that the demo and the
tests run the real readers. Labels follow the Table II prevalences of each split (the
external set gets the shifted MIMIC mix) and co-occur through a Gaussian copula; every
label leaves its own noisy, plausibly located trace on a procedurally drawn radiograph.
The external set also looks different (contrast curve, noise, field of view, JPEG).

Generation is deterministic in ``seed``, idempotent (a ``.complete`` marker holding the
parameters is written last) and crash-safe (it writes into a temporary sibling folder and
swaps it in, under a file lock so parallel jobs generate it once).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

from qtl.data.nih import LABEL_FILE
from qtl.data.records import DataError
from qtl.labels import ALL_LABELS, MIMIC_NAMES, prevalence
from qtl.utils.files import file_lock

GENERATOR_VERSION = 2  # bump when the output of the same parameters changes
MARKER = ".complete"
IMAGE_DIR = "images"
MIMIC_DIR = "mimic"
MIMIC_CSV = "mimic-cxr-lt_test.csv"  # inside MIMIC_DIR
SPLITS = ("train", "val", "test", "external")
_PREVALENCE_OF = {"train": "train", "val": "val", "test": "test", "external": "mimic"}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "external": 4}
_CHUNK = 32  # images per worker task

# ---------------------------------------------------------------------------------------
# Labels: Gaussian copula with a shared "sickness" factor plus clinically plausible pairs.
# Thresholding by rank gives each split exactly round(prevalence * n) positives per label.
# ---------------------------------------------------------------------------------------

SICKNESS = 0.22  # latent correlation shared by every pair of labels
PAIRS: dict[tuple[str, str], float] = {
    ("Effusion", "Atelectasis"): 0.30,
    ("Edema", "Cardiomegaly"): 0.35,
    ("Edema", "Effusion"): 0.25,
    ("Cardiomegaly", "Effusion"): 0.20,
    ("Emphysema", "Pneumothorax"): 0.25,
    ("Pneumonia", "Consolidation"): 0.30,
    ("Infiltration", "Pneumonia"): 0.15,
    ("Mass", "Nodule"): 0.20,
    ("Fibrosis", "Pleural Thickening"): 0.25,
    ("Pneumothorax", "Subcutaneous Emphysema"): 0.35,
    ("Pneumomediastinum", "Subcutaneous Emphysema"): 0.40,
    ("Calcification of the Aorta", "Tortuous Aorta"): 0.35,
}


def label_correlation() -> np.ndarray:
    """Latent correlation matrix over ALL_LABELS (positive definite by construction)."""
    n = len(ALL_LABELS)
    corr = np.full((n, n), SICKNESS)
    for (a, b), extra in PAIRS.items():
        i, j = ALL_LABELS.index(a), ALL_LABELS.index(b)
        corr[i, j] = corr[j, i] = SICKNESS + extra
    np.fill_diagonal(corr, 1.0)
    vals, vecs = np.linalg.eigh(corr)
    corr = (vecs * np.clip(vals, 1e-3, None)) @ vecs.T
    d = np.sqrt(np.diag(corr))
    return corr / d[:, None] / d[None, :]


def sample_labels(rng: np.random.Generator, n: int, prevalence_split: str) -> np.ndarray:
    """(n, 19) uint8 labels with Table II prevalences of ``prevalence_split``.

    Each label is positive on its top-k latent values, k = round(p * n), but at least a
    few (NIH-CXR-LT has >= 22 positives per label in every split, so no AUROC is undefined).
    """
    # Cholesky (unique) rather than multivariate_normal's SVD, whose signs vary by LAPACK
    latent = rng.standard_normal((n, len(ALL_LABELS))) @ np.linalg.cholesky(label_correlation()).T
    floor = max(1, min(3, n // 50))
    out = np.zeros((n, len(ALL_LABELS)), dtype=np.uint8)
    for j, label in enumerate(ALL_LABELS):
        k = min(n, max(floor, round(prevalence(label, prevalence_split) * n)))
        out[np.argsort(-latent[:, j], kind="stable")[:k], j] = 1
    return out


# ---------------------------------------------------------------------------------------
# Drawing. Everything is drawn in "body" coordinates (u right, v down, both ~[-1, 1]) that
# a per-image pose maps onto the pixel grid, so rotation/shift/scale cost nothing extra.
# Image left (u < 0) is the patient's right, as on a PA radiograph. Attenuation ~0 is air,
# ~0.6 soft tissue, lungs ~0.35 darker than tissue, bone ~0.1 brighter.
# ---------------------------------------------------------------------------------------

# Peak size of each label's trace (attenuation units unless noted), scaled per image by a
# random factor in [0.1, 1.3] (sometimes nearly invisible) and divided by `difficulty`.
# Tuned with a small CNN at 64 px (3000 train images) to a mean AUROC of about 0.8, with
# no label near 1 and the rare tail mostly fainter (harder as well as rarer).
TRACE: dict[str, float] = {
    "Atelectasis": 0.11,
    "Cardiomegaly": 0.20,  # relative heart enlargement
    "Effusion": 0.09,  # fluid height (fraction of the lung height)
    "Infiltration": 0.12,
    "Mass": 0.16,
    "Nodule": 0.17,
    "Pneumonia": 0.12,
    "Pneumothorax": 0.12,  # rim depth (fraction of the lung width)
    "Consolidation": 0.13,
    "Edema": 0.06,
    "Emphysema": 0.20,  # relative extra lucency
    "Fibrosis": 0.05,
    "Pleural Thickening": 0.20,
    "Hernia": 0.10,
    "Calcification of the Aorta": 0.14,
    "Pneumomediastinum": 0.09,
    "Pneumoperitoneum": 0.06,
    "Subcutaneous Emphysema": 0.09,
    "Tortuous Aorta": 0.22,  # relative aortic knob enlargement
}


@dataclass(frozen=True)
class Anatomy:
    """Body shape of one subject (shared by all of the subject's images)."""

    body_w: float  # half-width of the thorax
    tissue: float  # soft-tissue attenuation
    lung_cx: float
    lung_cy: float
    lung_rx: float
    lung_ry: float
    lung_dark: float  # how much darker aerated lung is than tissue
    dome: float  # diaphragm curvature
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    knob_r: float  # aortic knob radius
    rib_freq: float
    vessels: float  # strength of vascular markings
    bubble: float  # gastric bubble size (0 = none): a normal look-alike of free air


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_w=rng.uniform(0.86, 0.97),
        tissue=rng.uniform(0.55, 0.65),
        lung_cx=rng.uniform(0.38, 0.44),
        lung_cy=rng.uniform(-0.18, -0.08),
        lung_rx=rng.uniform(0.26, 0.31),
        lung_ry=rng.uniform(0.56, 0.66),
        lung_dark=rng.uniform(0.3, 0.4),
        dome=rng.uniform(0.12, 0.22),
        heart_cx=rng.uniform(0.04, 0.10),
        heart_cy=rng.uniform(0.17, 0.24),
        heart_rx=rng.normal(0.24, 0.02),
        heart_ry=rng.uniform(0.2, 0.24),
        knob_r=rng.normal(0.055, 0.007),
        rib_freq=rng.uniform(6.0, 7.5),
        vessels=rng.uniform(0.25, 0.45),
        bubble=rng.uniform(0.04, 0.08) if rng.random() < 0.6 else 0.0,
    )


@dataclass(frozen=True)
class Look:
    """Acquisition of one image: pose and intensity curve (the external set shifts these)."""

    angle: float
    scale: float
    shift_u: float
    shift_v: float
    contrast: float
    brightness: float
    gamma: float
    noise: float
    haze: float


def draw_look(rng: np.random.Generator, external: bool, difficulty: float) -> Look:
    if external:  # other scanners/protocol: flatter curve, brighter, noisier, wider field
        return Look(
            angle=rng.normal(0.0, 0.05),
            scale=rng.normal(0.9, 0.05),
            shift_u=rng.normal(0.0, 0.04),
            shift_v=rng.normal(0.05, 0.04),
            contrast=rng.uniform(0.75, 1.0),
            brightness=rng.normal(0.06, 0.05),
            gamma=math.exp(rng.normal(-0.25, 0.15)),
            noise=0.05 * difficulty,
            haze=rng.uniform(0.0, 0.12),
        )
    return Look(
        angle=rng.normal(0.0, 0.04),
        scale=rng.normal(1.0, 0.04),
        shift_u=rng.normal(0.0, 0.03),
        shift_v=rng.normal(0.0, 0.03),
        contrast=rng.uniform(0.85, 1.15),
        brightness=rng.normal(0.0, 0.04),
        gamma=math.exp(rng.normal(0.0, 0.12)),
        noise=0.03 * difficulty,
        haze=rng.uniform(0.0, 0.06),
    )


def _smooth(x: np.ndarray, edge: float) -> np.ndarray:
    """Soft step 0 -> 1 as x goes from -edge to +edge (cheap smoothstep)."""
    t = x * (0.5 / edge)
    t += 0.5
    np.clip(t, 0.0, 1.0, out=t)
    out = t * -2.0
    out += 3.0
    out *= t
    out *= t
    return out


def _noise(rng: np.random.Generator, px: int, cells: int) -> np.ndarray:
    """Smooth random field (unit-ish variance) with ``cells`` blobs across the image."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(
        Image.fromarray(small).resize((px, px), Image.Resampling.BICUBIC), dtype=np.float32
    )


class Canvas:
    """An attenuation map under construction plus the geometry that traces are placed by."""

    def __init__(self, px: int, anatomy: Anatomy, look: Look, rng: np.random.Generator):
        self.px, self.a, self.rng = px, anatomy, rng
        grid = np.linspace(-1.0, 1.0, px, dtype=np.float32)
        x, y = grid[None, :], grid[:, None]
        c, s = math.cos(look.angle), math.sin(look.angle)
        self.u = ((c * x + s * y) / look.scale - look.shift_u).astype(np.float32)
        self.v = ((-s * x + c * y) / look.scale - look.shift_v).astype(np.float32)
        self.att = np.zeros((px, px), dtype=np.float32)
        self.vessel_att = self.att  # brightening by vessel markings, set by _build_base
        self._lungs: dict[int, np.ndarray] = {}
        self.knob_r = anatomy.knob_r  # Tortuous Aorta enlarges it

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        """Normalised radius (1 on the outline) of an ellipse."""
        return np.sqrt(((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2)

    def blob(self, cu: float, cv: float, r: float, soft: float = 0.3) -> np.ndarray:
        return _smooth(1.0 - self.ellipse(cu, cv, r, r), soft)

    def lung_r(self, side: int, grow: float = 0.0, drop: float = 0.0) -> np.ndarray:
        """Normalised radius of a teardrop lung outline (narrow apex, wide base).

        ``grow`` (<0 shrinks) changes the outline size, ``drop`` moves it down/medially.
        """
        a = self.a
        rx, ry = a.lung_rx + grow, a.lung_ry + grow
        t = (self.v - a.lung_cy - drop) / ry
        width = rx * np.clip(0.85 + 0.25 * t, 0.5, 1.1)
        return np.sqrt(((self.u * side - a.lung_cx + 0.5 * drop) / width) ** 2 + t * t)

    def knob(self) -> tuple[float, float]:
        """Centre of the aortic knob, bulging into the upper left lung."""
        a = self.a
        height = a.lung_cy - 0.3 * a.lung_ry
        medial = a.lung_cx - a.lung_rx * (0.85 - 0.25 * 0.3)  # lung_x == -1 at that height
        return medial + 0.2 * self.knob_r, height

    def lung_x(self, side: int) -> np.ndarray:
        """Horizontal position across a lung: -1 medial edge, 0 centre, +1 lateral edge."""
        a = self.a
        t = (self.v - a.lung_cy) / a.lung_ry
        return (self.u * side - a.lung_cx) / (a.lung_rx * np.clip(0.85 + 0.25 * t, 0.5, 1.1))

    def diaphragm(self, side: int) -> np.ndarray:
        """Height (v) of a hemidiaphragm dome; the right one (image left) sits higher."""
        a = self.a
        lateral = (self.u * side - a.lung_cx) / a.lung_rx
        top = a.lung_cy + 0.82 * a.lung_ry - (0.03 if side < 0 else 0.0)
        return top + a.dome * lateral * lateral

    def lung(self, side: int) -> np.ndarray:
        if side not in self._lungs:
            inside = _smooth(1.0 - self.lung_r(side), 0.04)
            self._lungs[side] = inside * _smooth(self.diaphragm(side) - self.v, 0.015)
        return self._lungs[side]

    @property
    def lungs(self) -> np.ndarray:
        if 0 not in self._lungs:
            self._lungs[0] = np.maximum(self.lung(-1), self.lung(1))
        return self._lungs[0]

    def lung_point(self, side: int, zone: tuple[float, float] = (-0.7, 0.6)) -> tuple[float, float]:
        """A random point well inside one lung, vertical position within ``zone``."""
        a, rng = self.a, self.rng
        t = rng.uniform(*zone)
        w = math.sqrt(max(0.0, 1.0 - t * t)) * 0.7 * (0.85 + 0.25 * t)
        return side * (a.lung_cx + a.lung_rx * rng.uniform(-w, w)), a.lung_cy + a.lung_ry * t


def _build_base(cv: Canvas, amount: Mapping[str, float], ap: bool) -> None:
    """Body, lungs, mediastinum, heart, bones and vessels (with anatomy-level traces)."""
    a, rng, u, v = cv.a, cv.rng, cv.u, cv.v
    emph = amount.get("Emphysema", 0.0)
    if emph:  # hyperinflated: taller darker lungs, flat diaphragm, fewer vessels
        a = replace(
            a,
            lung_ry=a.lung_ry * (1 + 0.25 * emph),
            lung_dark=a.lung_dark * (1 + emph),
            dome=a.dome * max(0.0, 1 - 2 * emph),
            vessels=a.vessels * max(0.0, 1 - 1.5 * emph),
        )
        cv.a = a
    heart_scale = (1.0 + amount.get("Cardiomegaly", 0.0)) * (1.07 if ap else 1.0)
    cv.knob_r = a.knob_r * (1.0 + amount.get("Tortuous Aorta", 0.0))
    uu = (u / a.body_w) ** 2
    body = _smooth(1.0 - np.sqrt(uu * uu + ((v - 0.3) / 1.35) ** 2), 0.02)
    cv.att += a.tissue * body
    lungs = cv.lungs
    heart = _smooth(
        1.0 - cv.ellipse(a.heart_cx, a.heart_cy, a.heart_rx * heart_scale, a.heart_ry), 0.06
    )
    upper = _smooth(0.11 - np.abs(u - 0.01), 0.02) * _smooth(a.heart_cy - v, 0.05)
    mediastinum = np.maximum(upper, cv.blob(*cv.knob(), cv.knob_r, 0.25))
    open_lung = lungs * (1.0 - heart) * (1.0 - mediastinum)
    hilum = np.exp(-(((np.abs(u) - 0.2) / 0.2) ** 2 + ((v - a.lung_cy - 0.05) / 0.3) ** 2))
    vessels = np.clip(_noise(rng, cv.px, 20) * 0.5 + 0.4, 0, 1) * (0.3 + hilum) * a.vessels
    cv.vessel_att = a.lung_dark * open_lung * vessels
    cv.att -= a.lung_dark * open_lung - cv.vessel_att
    phase = (v - 1.1 * (np.abs(u) - 0.3) ** 2) * a.rib_freq
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 4 * _smooth(a.lung_cy + 0.45 - v, 0.1)
    cv.att += 0.05 * ribs * body * _smooth(np.abs(u) - 0.06, 0.03) * (0.3 + 0.7 * lungs)
    cv.att += 0.08 * _smooth(0.05 - np.abs(u), 0.015) * body  # spine
    cv.att -= 0.1 * _smooth(0.022 - np.abs(u), 0.008) * _smooth(-0.45 - v, 0.05)  # trachea
    clav = v - (-0.8 - 0.12 * (np.abs(u) - 0.1) + 0.25 * (np.abs(u) - 0.35) ** 2)
    clavicles = _smooth(0.025 - np.abs(clav), 0.01) * _smooth(0.65 - np.abs(u), 0.05)
    cv.att += 0.1 * clavicles * _smooth(np.abs(u) - 0.08, 0.02)
    if a.bubble:  # gastric bubble under the left hemidiaphragm
        top = a.lung_cy + 0.82 * a.lung_ry + 0.05
        gas = cv.ellipse(a.lung_cx - 0.05, top + a.bubble, a.bubble * 1.5, a.bubble)
        cv.att -= 0.2 * _smooth(1 - gas, 0.3)
    # small end-on vessels: normal look-alikes of nodules
    for _ in range(int(rng.integers(0, 3))):
        cu, c_v = cv.lung_point(_side(rng))
        cv.att += 0.1 * cv.blob(cu, c_v, 0.015, 0.5)


def _side(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


def _atelectasis(cv: Canvas, s: float) -> None:
    rng = cv.rng
    cu, c_v = cv.lung_point(_side(rng), (0.1, 0.6))
    ang = rng.uniform(-0.4, 0.4)
    du, dv = cv.u - cu, cv.v - c_v
    along = du * math.cos(ang) + dv * math.sin(ang)
    across = -du * math.sin(ang) + dv * math.cos(ang)
    half, thick = rng.uniform(0.1, 0.18), rng.uniform(0.015, 0.03)
    band = _smooth(thick - np.abs(across), 0.012) * _smooth(half - np.abs(along), 0.04)
    cv.att += s * band * cv.lungs


def _effusion(cv: Canvas, s: float) -> None:
    a, rng = cv.a, cv.rng
    for side in [-1, 1] if rng.random() < 0.3 else [_side(rng)]:
        lateral = np.clip((cv.u * side - a.lung_cx) / a.lung_rx, -1, 1)
        level = cv.diaphragm(side) - s * a.lung_ry * 1.3 * (1.0 + 0.5 * lateral)  # meniscus
        density = min(0.95, 4.0 * s)  # small effusions are also thin layers
        cv.att += density * a.lung_dark * _smooth(cv.v - level, 0.02) * cv.lung(side)


def _pneumothorax(cv: Canvas, s: float) -> None:
    a = cv.a
    side = _side(cv.rng)
    d = s * a.lung_rx * 1.4
    shrunk = cv.lung_r(side, grow=-d, drop=d)
    upper = _smooth(a.lung_cy + 0.3 * a.lung_ry - cv.v, 0.1)
    rim = cv.lung(side) * _smooth(shrunk - 1.0, 0.03) * upper
    cv.att -= rim * (cv.vessel_att + 0.06)  # no vessel markings, darker
    cv.att += 0.08 * cv.lung(side) * _smooth(0.03 - np.abs(shrunk - 1.0), 0.015) * upper


def _mass(cv: Canvas, s: float) -> None:
    cu, c_v = cv.lung_point(_side(cv.rng))
    cv.att += s * cv.blob(cu, c_v, cv.rng.uniform(0.05, 0.09), 0.35)


def _nodule(cv: Canvas, s: float) -> None:
    for _ in range(int(cv.rng.integers(1, 4))):
        cu, c_v = cv.lung_point(_side(cv.rng))
        cv.att += s * cv.blob(cu, c_v, cv.rng.uniform(0.018, 0.032), 0.4)


def _patches(cv: Canvas, cells: int, cover: float) -> np.ndarray:
    """Soft random patches covering roughly ``cover`` of the field."""
    return _smooth(_noise(cv.rng, cv.px, cells) - NormalDist().inv_cdf(1 - cover) * 0.8, 0.35)


def _infiltration(cv: Canvas, s: float) -> None:
    zone = cv.blob(*cv.lung_point(_side(cv.rng), (-0.5, 0.5)), 0.35, 0.5)
    cv.att += s * _patches(cv, 14, 0.35) * zone * cv.lungs


def _pneumonia(cv: Canvas, s: float) -> None:
    cu, c_v = cv.lung_point(_side(cv.rng), (0.0, 0.6))
    fluffy = 0.6 + 0.4 * _patches(cv, 24, 0.5)
    cv.att += s * cv.blob(cu, c_v, cv.rng.uniform(0.12, 0.18), 0.6) * fluffy * cv.lungs


def _consolidation(cv: Canvas, s: float) -> None:
    a, rng = cv.a, cv.rng
    side = _side(rng)
    tilt = rng.uniform(0.3, 0.8)
    fissure = a.lung_cy + rng.uniform(-0.05, 0.2) - tilt * (cv.u * side - a.lung_cx)
    lobe = _smooth(cv.v - fissure, 0.015) if rng.random() < 0.6 else _smooth(fissure - cv.v, 0.015)
    cv.att += s * lobe * cv.lung(side)


def _edema(cv: Canvas, s: float) -> None:
    a = cv.a
    wings = np.exp(-(((np.abs(cv.u) - 0.2) / 0.2) ** 2 + ((cv.v - a.lung_cy - 0.1) / 0.3) ** 2))
    kerley = _smooth(0.006 - np.abs(((cv.v * 22.0) % 1.0) - 0.5) / 22.0, 0.004)
    base = _smooth(np.abs(cv.u) - a.lung_cx - 0.5 * a.lung_rx, 0.03) * _smooth(cv.v - 0.15, 0.05)
    cv.att += s * (wings + 0.5 * kerley * base) * cv.lungs


def _fibrosis(cv: Canvas, s: float) -> None:
    a = cv.a
    reticular = _smooth(0.12 - np.abs(_noise(cv.rng, cv.px, 28)), 0.06)
    periphery = _smooth(np.abs(cv.u) - a.lung_cx + 0.05, 0.08) * _smooth(cv.v - a.lung_cy, 0.15)
    cv.att += s * 1.3 * reticular * periphery * cv.lungs


def _pleural_thickening(cv: Canvas, s: float) -> None:
    a, rng = cv.a, cv.rng
    side = _side(rng)
    r = cv.lung_r(side)
    band = _smooth(r - 0.8, 0.04) * _smooth(1.02 - r, 0.02)
    span = cv.v - (a.lung_cy + rng.uniform(-0.6, 0.2) * a.lung_ry)
    lateral = _smooth(cv.u * side - a.lung_cx, 0.05) * _smooth(0.35 - np.abs(span), 0.1)
    cv.att += s * 2.0 * band * lateral


def _hernia(cv: Canvas, s: float) -> None:
    a = cv.a
    cu, c_v, r = a.heart_cx + cv.rng.uniform(-0.05, 0.05), a.heart_cy + 0.02, 0.07
    inside = cv.blob(cu, c_v, r, 0.15)
    rim = _smooth(0.12 - np.abs(cv.ellipse(cu, c_v, r, r) - 1.0), 0.06)
    fluid = _smooth(cv.v - c_v - 0.2 * r, 0.01)
    cv.att += s * (0.8 * rim - 1.2 * inside * (1.0 - fluid))


def _aortic_calcification(cv: Canvas, s: float) -> None:
    r = cv.knob_r
    cu, c_v = cv.knob()
    crescent = _smooth(0.3 - np.abs(cv.ellipse(cu, c_v, r, r) - 1.0), 0.1)
    top_lateral = _smooth(cv.u - cu + 0.3 * r, 0.02) * _smooth(c_v + 0.3 * r - cv.v, 0.02)
    cv.att += s * 2.5 * crescent * top_lateral


def _tortuous_aorta(cv: Canvas, s: float) -> None:
    """Besides the larger knob (_build_base): a wavy descending aorta along the left lung."""
    a = cv.a
    wave = 0.5 + 0.5 * np.sin(cv.v * 12.0 + cv.rng.uniform(0, 6.28))
    border = _smooth(-1.0 + 0.6 * s * wave - cv.lung_x(1), 0.03)
    span = _smooth(0.25 - np.abs(cv.v - a.lung_cy - 0.05), 0.05)
    cv.att += a.lung_dark * border * span * cv.lung(1)


def _pneumomediastinum(cv: Canvas, s: float) -> None:
    streak = _smooth(0.012 - np.abs(np.abs(cv.u - 0.01) - 0.12), 0.008)
    cv.att -= s * 1.5 * streak * _smooth(0.3 - np.abs(cv.v + 0.3), 0.05)


def _pneumoperitoneum(cv: Canvas, s: float) -> None:
    a = cv.a
    side = -1 if cv.rng.random() < 0.7 else 1  # mostly under the right hemidiaphragm
    below = cv.v - cv.diaphragm(side)
    crescent = _smooth(below - 0.015, 0.01) * _smooth(0.05 - below, 0.015)
    span = _smooth(a.lung_rx * 0.9 - np.abs(cv.u * side - a.lung_cx), 0.05)
    cv.att -= s * 1.6 * crescent * span


def _subcutaneous_emphysema(cv: Canvas, s: float) -> None:
    a = cv.a
    side = _side(cv.rng)
    wall = _smooth(cv.u * side - a.lung_cx - a.lung_rx - 0.01, 0.02)
    wall *= _smooth(a.body_w - 0.03 - cv.u * side, 0.02) * _smooth(0.5 - cv.v, 0.1)
    wave = np.sin(30.0 * (cv.v + 0.4 * np.abs(cv.u)) + 4 * _noise(cv.rng, cv.px, 8))
    cv.att -= s * 1.6 * _smooth(wave - 0.5, 0.3) * wall


# Traces painted after the base anatomy (Cardiomegaly, Emphysema and Tortuous Aorta also
# change the anatomy itself in _build_base).
PAINTERS: dict[str, Callable[[Canvas, float], None]] = {
    "Atelectasis": _atelectasis,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Fibrosis": _fibrosis,
    "Pleural Thickening": _pleural_thickening,
    "Hernia": _hernia,
    "Calcification of the Aorta": _aortic_calcification,
    "Pneumomediastinum": _pneumomediastinum,
    "Pneumoperitoneum": _pneumoperitoneum,
    "Subcutaneous Emphysema": _subcutaneous_emphysema,
    "Tortuous Aorta": _tortuous_aorta,
}


def render(
    labels: Iterable[str],
    anatomy: Anatomy,
    rng: np.random.Generator,
    *,
    px: int,
    difficulty: float = 1.0,
    external: bool = False,
    view: str = "PA",
) -> np.ndarray:
    """One (px, px) uint8 radiograph showing a noisy trace of each of ``labels``."""
    present = set(labels)
    look = draw_look(rng, external, difficulty)
    # per-image trace strength: sometimes almost invisible
    amount = {name: TRACE[name] * rng.uniform(0.1, 1.3) / difficulty for name in sorted(present)}
    # Shapes are smooth, so they are drawn at half resolution and upsampled (4x faster);
    # the pixel noise is added at full resolution.
    cv = Canvas(px // 2 if px >= 128 else px, anatomy, look, rng)
    if view in ("LL", "LATERAL"):
        _draw_lateral(cv)
    else:
        _build_base(cv, amount, ap=view == "AP")
        for name in ALL_LABELS:
            if name in present and name in PAINTERS:
                PAINTERS[name](cv, amount[name])
    att = cv.att + look.haze * _noise(rng, cv.px, 4) * 0.5
    img = np.clip(look.contrast * 1.3 * att + look.brightness, 0.0, 1.0) ** look.gamma
    if cv.px != px:
        img = np.array(Image.fromarray(img).resize((px, px), Image.Resampling.BICUBIC))
    img += rng.standard_normal((px, px), dtype=np.float32) * look.noise
    img *= 255.0
    img += 0.5
    return np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)


def _draw_lateral(cv: Canvas) -> None:
    """A side view (the reader must drop these): one lung field, spine at the back."""
    a = cv.a
    body = _smooth(1.0 - cv.ellipse(0.0, 0.2, 0.75, 1.25), 0.03)
    lung = _smooth(1.0 - cv.ellipse(0.0, -0.05, 0.5, 0.6), 0.06)
    heart = cv.blob(-0.25, 0.3, 0.25, 0.2)
    cv.att += a.tissue * body - a.lung_dark * lung * (1 - heart)
    cv.att += 0.1 * _smooth(0.08 - np.abs(cv.u - 0.55), 0.02) * body


# ---------------------------------------------------------------------------------------
# File formats (shared with the tests, which write tiny hand-made datasets).
# ---------------------------------------------------------------------------------------


def _label_cells(row: Mapping[str, object]) -> tuple[list[object], int]:
    """The 19 label cells of a row (absent = 0) and its ``No Finding`` flag."""
    cells = [row.get(label, 0) for label in ALL_LABELS]
    return cells, int(not any(str(c).strip() in ("1", "1.0") for c in cells))


def write_nih_csv(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Write an NIH-CXR-LT label file; rows map ``id``, ``subj_id`` and labels (absent = 0)."""
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["id", *ALL_LABELS, "No Finding", "subj_id"])
        for row in rows:
            cells, no_finding = _label_cells(row)
            out.writerow([row["id"], *cells, no_finding, row.get("subj_id", 0)])


MIMIC_META = ("dicom_id", "subject_id", "study_id", "path", "ViewPosition")


def write_mimic_csv(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Write a MIMIC-CXR-LT label file; labels by NIH name (``Effusion`` is renamed)."""
    names = [MIMIC_NAMES.get(label, label) for label in ALL_LABELS]
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow([*MIMIC_META, *names, "No Finding"])
        for row in rows:
            cells, no_finding = _label_cells(row)
            out.writerow([*(row[key] for key in MIMIC_META), *cells, no_finding])


# ---------------------------------------------------------------------------------------
# Plan: ids, subjects and labels of every image, drawn up front from the seed.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    relpath: str  # file to write, relative to the dataset root
    labels: tuple[str, ...]
    subject: int
    key: tuple[int, ...]  # seed material of the image
    external: bool
    view: str


def _subjects(rng: np.random.Generator, n: int) -> Iterator[int]:
    """Subject index per image: 1-6 consecutive images per subject (follow-ups)."""
    subject, left = 0, 0
    for _ in range(n):
        if left == 0:
            subject, left = subject + 1, int(min(6, rng.geometric(0.45)))
        left -= 1
        yield subject


def _plan(spec: Mapping[str, object]) -> tuple[dict[str, list[dict[str, object]]], list[Job]]:
    seed, sizes = int(spec["seed"]), dict(spec["sizes"])  # type: ignore[arg-type]
    tables: dict[str, list[dict[str, object]]] = {}
    jobs: list[Job] = []
    first_subject = 0
    for split in SPLITS:
        n = int(sizes.get(split, 0))
        if n == 0:
            continue
        code = _SPLIT_CODE[split]
        rng = np.random.default_rng([seed, code, 0])
        labels = sample_labels(rng, n, _PREVALENCE_OF[split])
        names = [tuple(ALL_LABELS[j] for j in np.flatnonzero(row)) for row in labels]
        if split == "external":
            tables[split] = _plan_mimic(rng, seed, names, jobs)
            continue
        rows = []
        follow = 0
        prev = -1
        for i, subject in enumerate(_subjects(rng, n)):
            follow = follow + 1 if subject == prev else 0
            prev = subject
            subj = first_subject + subject
            image_id = f"{subj:08d}_{follow:03d}.png"
            rows.append({"id": image_id, "subj_id": subj, **dict.fromkeys(names[i], 1)})
            jobs.append(
                Job(f"{IMAGE_DIR}/{image_id}", names[i], subj, (seed, code, i), False, "PA")
            )
        first_subject += prev
        tables[split] = rows
    return tables, jobs


def _plan_mimic(
    rng: np.random.Generator, seed: int, names: list[tuple[str, ...]], jobs: list[Job]
) -> list[dict[str, object]]:
    """MIMIC-style rows: subjects p1XXXXXXX, studies sXXXXXXXX, some lateral extras."""
    n = len(names)
    subjects = np.sort(rng.choice(9_000_000, size=n, replace=False)) + 10_000_000
    studies = rng.choice(10_000_000, size=2 * n, replace=False) + 50_000_000
    rows: list[dict[str, object]] = []
    order = list(_subjects(rng, n))
    for i, label_names in enumerate(names):
        subject, study = int(subjects[order[i] - 1]), int(studies[i])
        views = ["AP" if rng.random() < 0.6 else "PA"]
        if rng.random() < 0.25:
            views.append("LATERAL" if rng.random() < 0.5 else "LL")
        for k, view in enumerate(views):
            dicom = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
            path = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
            rows.append(
                {
                    "dicom_id": dicom,
                    "subject_id": subject,
                    "study_id": study,
                    "path": path,
                    "ViewPosition": view,
                    **dict.fromkeys(label_names, 1),
                }
            )
            key = (seed, _SPLIT_CODE["external"], i, k)
            jobs.append(Job(f"{MIMIC_DIR}/{path}", label_names, subject, key, True, view))
    return rows


def _write_images(root: Path, jobs: Sequence[Job], seed: int, px: int, difficulty: float) -> int:
    """Render and save a chunk of images (one worker task); returns how many."""
    for job in jobs:
        anatomy = draw_anatomy(np.random.default_rng([seed, 99, job.subject]))
        img = render(
            job.labels,
            anatomy,
            np.random.default_rng(list(job.key)),
            px=px,
            difficulty=difficulty,
            external=job.external,
            view=job.view,
        )
        path = root / job.relpath
        if job.external:
            path.parent.mkdir(parents=True, exist_ok=True)
            quality = 75 + (job.key[2] * 7) % 20  # other scanners, other compression
            Image.fromarray(img).save(path, format="JPEG", quality=quality)
        else:
            # Huffman-only deflate: these noisy images barely compress anyway, and it is 2x faster
            Image.fromarray(img).save(path, format="PNG", compress_type=zlib.Z_HUFFMAN_ONLY)
    return len(jobs)


# ---------------------------------------------------------------------------------------
# Generation with marker, lock and swap.
# ---------------------------------------------------------------------------------------


def spec(
    *, sizes: Mapping[str, int], image_px: int, seed: int, difficulty: float = 1.0
) -> dict[str, object]:
    """The parameters that fully determine a dataset (what the marker stores)."""
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise DataError(f"data.synth_sizes: unknown split(s) {unknown}; use {list(SPLITS)}.")
    bad = {k: v for k, v in sizes.items() if int(v) < (1 if k != "external" else 0)}
    if bad or any(k not in sizes for k in SPLITS[:3]):
        raise DataError(
            f"data.synth_sizes={dict(sizes)}: train, val and test need at least one image "
            "each (external may be 0)."
        )
    if image_px < 32 or difficulty <= 0:
        raise DataError(
            f"data.synth_image_px={image_px} must be >= 32 and "
            f"data.synth_difficulty={difficulty} > 0."
        )
    return {
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "sizes": {k: int(sizes.get(k, 0)) for k in SPLITS},
        "image_px": int(image_px),
        "difficulty": float(difficulty),
    }


def spec_hash(params: Mapping[str, object]) -> str:
    """Short stable hash of a spec, for default cache folder names."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def is_complete(root: Path, params: Mapping[str, object]) -> bool:
    try:
        return json.loads((Path(root) / MARKER).read_text())["params"] == params
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _locked(root: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive lock beside ``root`` so parallel jobs (multirun) generate only once."""
    return file_lock(root.parent / f".{root.name}.lock")


def _owned(root: Path) -> bool:
    """True when ``root`` is absent, empty or holds only what this generator writes."""
    if not root.exists():
        return True
    ours = {MARKER, IMAGE_DIR, MIMIC_DIR} | {LABEL_FILE.format(split=s) for s in SPLITS[:3]}
    return root.is_dir() and all(p.name in ours for p in root.iterdir())


def generate(
    root: Path,
    *,
    sizes: Mapping[str, int],
    image_px: int,
    seed: int,
    difficulty: float = 1.0,
    progress: bool = False,
) -> Path:
    """Write the synthetic dataset to ``root`` unless an identical one is already there."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    params = spec(sizes=sizes, image_px=image_px, seed=seed, difficulty=difficulty)
    root = Path(root).expanduser().absolute()
    if is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if is_complete(root, params):  # another process finished it while we waited
            return root
        if not _owned(root):
            raise DataError(
                f"{root} exists and holds files that are not a qtl synthetic dataset; refusing "
                "to overwrite it. Point data.root at an empty or new folder."
            )
        for kind in ("tmp", "old"):  # left by a crashed run
            for stale in root.parent.glob(f".{root.name}.{kind}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            tables, jobs = _plan(params)
            (tmp / IMAGE_DIR).mkdir(parents=True)
            (tmp / MIMIC_DIR).mkdir()
            for split in SPLITS[:3]:
                write_nih_csv(tmp / LABEL_FILE.format(split=split), tables[split])
            if "external" in tables:
                write_mimic_csv(tmp / MIMIC_DIR / MIMIC_CSV, tables["external"])
            chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
            # processes (numpy drawing holds the GIL); tiny sets skip the ~1 s worker start
            n_jobs = 1 if len(jobs) < 8 * _CHUNK else os.cpu_count() or 1
            done = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(_write_images)(tmp, chunk, seed, image_px, difficulty) for chunk in chunks
            )
            with tqdm(
                total=len(jobs), desc="synthetic CXR-LT", unit="img", disable=not progress
            ) as bar:
                for n in done:
                    bar.update(n)
            marker = {"params": params, "images": len(jobs)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            if root.exists():
                old = root.parent / f".{root.name}.old-{os.getpid()}"
                root.rename(old)
                tmp.rename(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
