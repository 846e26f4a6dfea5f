"""Contrast: the Hounsfield-to-grey mapping of the stand-ins, histogram landmarks, and the window step.

The challenge's slices behave like a wide CT window (about -1000..1000 HU to 0..255): soft tissues sit
within a few dozen grey levels of each other. Every method therefore runs behind a `contrast` step
(the experiment YAML's `contrast:` section): `none`, a fixed window in input grey levels, or `auto`,
which finds the fat and soft-tissue peaks of the data set's histogram, infers the grey level of any
Hounsfield value from them, and stretches a chosen HU window (soft tissue by default) to 0..255.
Networks may add further input channels with other windows (bone, a wider soft-tissue window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comp.errors import UserError

# The challenge-like window that the phantom and the importer render through by default.
HU_WINDOW = (-1000.0, 1000.0)
# Histogram landmarks in HU. SOFT_HU is where the soft-tissue peak of abdominal CT lies (muscle,
# organs, bowel wall and partial-volume rims together): about 25 HU on the proxy's unenhanced CT,
# higher with contrast; 40 keeps the implied scale within ~10% of either.
AIR_HU, FAT_HU, SOFT_HU = -1000.0, -100.0, 40.0
TISSUE_FROM = 8  # peaks below this grey level are air (outside the body, lungs, bowel gas)
BONE_QUANTILE = 99.5  # the bone tail: this percentile of the body's pixels


def hu_to_grey(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    """Map Hounsfield units in [lo, hi] linearly to uint8 0..255 (lo -> 0, hi -> 255, rounded, clipped)."""
    return np.clip(np.rint((np.asarray(hu, np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


@dataclass
class Landmarks:
    """Peaks of a data set's grey-level histogram and the linear grey = offset + scale * HU they imply."""

    air: float | None  # grey level of the air peak (None when air is clipped to 0)
    fat: float
    soft: float
    bone: float  # the bone tail (BONE_QUANTILE of body pixels)
    scale: float  # grey levels per HU
    offset: float  # grey level of 0 HU

    def grey(self, hu: float) -> float:
        """Grey level of a Hounsfield value."""
        return self.offset + self.scale * hu

    def hu(self, grey: float) -> float:
        """Hounsfield value of a grey level."""
        return (grey - self.offset) / self.scale

    def window(self) -> tuple[float, float]:
        """The HU window the data set was rendered with (HU of grey 0 and 255)."""
        return self.hu(0.0), self.hu(255.0)


def _otsu(hist: np.ndarray) -> int:
    """Otsu threshold of a histogram (first bin of the upper class)."""
    p = hist / max(hist.sum(), 1)
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(len(p)))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)
    return int(np.argmax(between[:-1])) + 1


def _peaks(h: np.ndarray, lo: int, min_sep: int) -> list[int]:
    """Local maxima of h at or above bin lo, highest first, each at least min_sep bins from a higher one."""
    idx = [i for i in range(max(lo, 1), len(h) - 1) if h[i] >= h[i - 1] and h[i] > h[i + 1] and h[i] > 0]
    kept: list[int] = []
    for i in sorted(idx, key=lambda j: -h[j]):
        if all(abs(i - k) >= min_sep for k in kept):
            kept.append(i)
    return kept


def histogram(x: np.ndarray, max_images: int = 200) -> np.ndarray:
    """256-bin grey-level histogram of up to max_images evenly spaced slices."""
    step = max(1, len(x) // max(max_images, 1))
    hist = np.zeros(256, np.int64)
    for s in x[::step][:max_images]:
        hist += np.bincount(s.ravel(), minlength=256)
    return hist


def landmarks(hist: np.ndarray, where: str = "data") -> Landmarks:
    """Air, fat, soft-tissue and bone landmarks of a histogram, and the HU calibration they imply."""
    from scipy import ndimage as ndi  # here: the command line imports this module for its constants

    h = hist.astype(np.float64).copy()
    h[0] = h[255] = 0  # clipped values say nothing about where a tissue lies
    smooth = ndi.gaussian_filter1d(h, 1.0)
    # Fat and soft tissue are the two highest peaks above the air; with air clipped to 0 (a narrow
    # window) Otsu would split fat from soft tissue, so it only bounds the air peak and the bone tail.
    tissue = _peaks(smooth, TISSUE_FROM, min_sep=4)
    if len(tissue) < 2:
        raise UserError(where, "cannot find fat and soft-tissue peaks in the grey-level histogram; give contrast.window as [lo, hi]")
    fat, soft = sorted(_refine(smooth, p) for p in tissue[:2])
    scale = (soft - fat) / (SOFT_HU - FAT_HU)
    offset = fat - scale * FAT_HU
    body = min(_otsu(h), int(fat) - 2)
    air = next((float(p) for p in _peaks(smooth, 1, 4) if 2 < p < body), None)
    cum = np.cumsum(h[body:])
    bone = float(body + np.searchsorted(cum, cum[-1] * BONE_QUANTILE / 100)) if cum[-1] else 255.0
    return Landmarks(air, float(fat), float(soft), bone, float(scale), float(offset))


def _refine(h: np.ndarray, i: int) -> float:
    """Sub-bin position of a peak (parabola through the peak and its neighbours)."""
    a, b, c = h[i - 1], h[i], h[i + 1]
    den = a - 2 * b + c
    return float(i + (0.5 * (a - c) / den if den < 0 else 0.0))


@dataclass
class ContrastParams:
    """The `contrast:` section of an experiment: how input grey levels are windowed before a method sees them."""

    window: Any = "none"  # none | auto | [lo, hi] in input grey levels (lo -> 0, hi -> 255)
    hu: list[float] = field(default_factory=lambda: [-350.0, 450.0])  # the HU window `auto` stretches to 0..255
    channels: list[list[float]] = field(default_factory=list)  # networks: extra input windows, in HU (via the calibration)


@dataclass(frozen=True)
class Contrast:
    """A contrast step resolved for one data set: windows in input grey levels."""

    window: tuple[float, float] = (0.0, 255.0)
    channels: tuple[tuple[float, float], ...] = ()

    def stretch(self, x: np.ndarray) -> np.ndarray:
        """uint8 slices with the window stretched to 0..255 (a lookup table; identity for none)."""
        if self.window == (0.0, 255.0):
            return x
        lo, hi = self.window
        lut = np.clip(np.rint((np.arange(256) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        return lut[x]

    def unit_affine(self) -> tuple[float, float]:
        """(a, b) with a * x/255 + b = 0 at the window's low end and 1 at its high end (unclipped)."""
        lo, hi = self.window
        return 255.0 / (hi - lo), -lo / (hi - lo)

    def stem_windows(self) -> tuple[tuple[float, float], ...]:
        """Every network input channel as (low, high) in the main window's units: the main one is (0, 1)."""
        lo, hi = self.window
        return ((0.0, 1.0),) + tuple(((a - lo) / (hi - lo), (b - lo) / (hi - lo)) for a, b in self.channels)

    def to_dict(self) -> dict:
        """Plain data, as stored in a run's config."""
        return {"window": [round(v, 4) for v in self.window], "channels": [[round(v, 4) for v in c] for c in self.channels]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Contrast":
        """Inverse of to_dict (an absent entry means no contrast step)."""
        if not d:
            return cls()
        return cls(tuple(float(v) for v in d["window"]), tuple(tuple(float(v) for v in c) for c in d.get("channels", [])))


def _window(value: Any, where: str, key: str) -> tuple[float, float]:
    """A [lo, hi] pair with lo < hi, or a clear error naming the key."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not float(value[0]) < float(value[1]):
        raise UserError(where, f"'{key}' must be none, auto or [lo, hi] with lo < hi, got {value!r}")
    return float(value[0]), float(value[1])


def resolve(p: ContrastParams, x: np.ndarray, where: str = "contrast") -> Contrast:
    """Resolve the contrast section on a data set's slices (`auto` and HU channels read its histogram, never labels)."""
    needs_calibration = p.window == "auto" or bool(p.channels)
    marks = landmarks(histogram(x), where) if needs_calibration else None
    hu_lo, hu_hi = _window(p.hu, where, "contrast.hu")
    if p.window in ("none", None):
        window = (0.0, 255.0)
    elif p.window == "auto":
        window = (marks.grey(hu_lo), marks.grey(hu_hi))
    else:
        window = _window(p.window, where, "contrast.window")
    channels = tuple((marks.grey(a), marks.grey(b)) for a, b in (_window(c, where, "contrast.channels") for c in p.channels))
    return Contrast((round(window[0], 4), round(window[1], 4)), tuple((round(a, 4), round(b, 4)) for a, b in channels))
