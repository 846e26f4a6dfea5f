"""Calibration: where a histogram's landmarks (air, fat, soft tissue, bone) put each Hounsfield value in grey
levels, for a data set's histogram and for one slice's own pixels (far-apart landmarks), and the survey of how
much the slices' windows spread."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from comp.core.errors import UserError


# The challenge-like window that the phantom and the importer render through by default.
HU_WINDOW = (-1000.0, 1000.0)
# The noise (sd, HU) `comp data proxy` adds before windowing by default. The proxy's 3 mm voxels, stretched ~4x, are far
# smoother than a native slice (about half a grey level of noise in soft tissue at HU_WINDOW), and mergers fitted on
# that smoothness did not carry to sharp, noisy slices. 15 HU is the middle of native abdominal CT's 10-25 HU, set
# before any run on those grounds; `--noise-hu 0` renders the smooth proxy of figures dated before 2026-12-07.
NATIVE_NOISE_HU = 15.0
# Histogram landmarks in HU. SOFT_HU is where the soft-tissue peak of abdominal CT lies (muscle,
# organs, bowel wall and partial-volume rims together): about 25 HU on the proxy's unenhanced CT,
# higher with contrast; 40 keeps the implied scale within ~10% of either.
AIR_HU, FAT_HU, SOFT_HU = -1000.0, -100.0, 40.0
TISSUE_FROM = 8  # peaks below this grey level are air (outside the body, lungs, bowel gas)
BONE_QUANTILE = 99.5  # the bone tail: this percentile of the body's pixels


@dataclass(frozen=True)
class Calibration:
    """A linear grey = offset + scale * HU."""

    offset: float  # grey level of 0 HU
    scale: float  # grey levels per HU

    def grey(self, hu: float) -> float:
        """Grey level of a Hounsfield value."""
        return self.offset + self.scale * hu

    def hu(self, grey: float) -> float:
        """Hounsfield value of a grey level."""
        return (grey - self.offset) / self.scale

    def window(self) -> tuple[float, float]:
        """The HU window of grey 0 and 255 (the one the slices were rendered with)."""
        return self.hu(0.0), self.hu(255.0)


@dataclass(frozen=True)
class Landmarks(Calibration):
    """Peaks of a data set's grey-level histogram, and the calibration they imply."""

    air: float | None = None  # grey level of the air peak (None when air is clipped to 0)
    fat: float = 0.0
    soft: float = 0.0
    bone: float = 255.0  # the bone tail (BONE_QUANTILE of body pixels)


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


def evenly_spaced(x: np.ndarray, n: int) -> np.ndarray:
    """Up to n evenly spaced items of x (all of them when n >= len(x))."""
    return x[:: max(1, len(x) // max(n, 1))][:n]


def histogram(x: np.ndarray, max_images: int = 200) -> np.ndarray:
    """256-bin grey-level histogram of up to max_images evenly spaced slices."""
    hist = np.zeros(256, np.int64)
    for s in evenly_spaced(x, max_images):
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
    return Landmarks(float(offset), float(scale), air, float(fat), float(soft), bone)


def _refine(h: np.ndarray, i: int) -> float:
    """Sub-bin position of a peak (parabola through the peak and its neighbours)."""
    a, b, c = h[i - 1], h[i], h[i + 1]
    den = a - 2 * b + c
    return float(i + (0.5 * (a - c) / den if den < 0 else 0.0))


CANONICAL = Calibration(-HU_WINDOW[0] * 255.0 / (HU_WINDOW[1] - HU_WINDOW[0]), 255.0 / (HU_WINDOW[1] - HU_WINDOW[0]))
SCALES = (255.0 / 20000.0, 255.0 / 400.0)  # plausible grey levels per HU: windows 400..20,000 HU wide
AIR_VISIBLE = 2  # an air peak at or above this grey level (and above the clipped bin 0) is not clipped


def _air_peak(h: np.ndarray, body_from: int) -> float | None:
    """Grey level of the air outside the body, or None where the window clips it to 0."""
    from scipy import ndimage as ndi

    a = int(np.argmax(h[:body_from]))
    if a < AIR_VISIBLE or h[a] <= h[0]:
        return None
    return _refine(ndi.gaussian_filter1d(h, 0.7), a)


def _tissue_pair(body: np.ndarray, sigma: float, lo: int, hi: int, sep: int) -> tuple[float, float] | None:
    """(fat, soft tissue) grey levels: the two highest peaks of the body histogram in lo..hi, at least sep apart."""
    from scipy import ndimage as ndi

    sm = ndi.gaussian_filter1d(body, sigma)
    peaks = [p for p in _peaks(sm, max(lo, 1), max(sep, 2)) if p <= hi]
    if len(peaks) < 2:
        return None
    fat, soft = sorted(_refine(sm, p) for p in peaks[:2])
    return fat, soft


def _slice_landmarks(img: np.ndarray) -> tuple[float | None, Calibration | None]:
    """One slice's air peak (None where clipped) and its HU calibration (None where it lacks the landmarks).

    With the air visible (a wide window), a coarse scale from the air and the body's mode places the fat and
    soft-tissue peaks, and a line through air, fat and soft tissue (air-to-tissue, ~1,000 HU apart, sets the
    scale) is the calibration. With the air clipped to 0 (a narrow window) fat and soft tissue are far enough
    apart in grey levels to give it alone."""
    h = np.bincount(np.asarray(img, np.uint8).ravel(), minlength=256).astype(np.float64)
    h[255] = 0
    body_from = _otsu(h)
    air = _air_peak(h, body_from)
    body = h.copy()
    body[:body_from] = 0
    if air is not None:
        mode = int(np.argmax(body))
        s0 = (mode - air) / ((FAT_HU + SOFT_HU) / 2 - AIR_HU)  # the mode lies between fat and soft tissue
        if not SCALES[0] <= s0 <= SCALES[1]:
            return air, None
        pair = _tissue_pair(body, max(0.6, 10 * s0), int(air + s0 * (-250 - AIR_HU)), int(air + s0 * (200 - AIR_HU)), int(70 * s0))
        if pair is None:
            return air, None
        scale, offset = np.polyfit([AIR_HU, FAT_HU, SOFT_HU], [air, *pair], 1)
    else:
        pair = _tissue_pair(body, 1.0, max(body_from, TISSUE_FROM), 254, 4)
        if pair is None:
            return air, None
        scale = (pair[1] - pair[0]) / (SOFT_HU - FAT_HU)
        offset = pair[0] - scale * FAT_HU
    return air, Calibration(float(offset), float(scale)) if SCALES[0] <= scale <= SCALES[1] else None


def slice_calibration(img: np.ndarray) -> Calibration | None:
    """One slice's HU calibration from its own pixels, or None where it lacks the landmarks."""
    return _slice_landmarks(img)[1]


AIR_IQR, WIDTH_IQR = 4.0, 0.25  # set on the stand-ins rendered both ways (one window: 0 and 0.05-0.12; per slice: >= 10 and ~0.33)


@dataclass
class Survey:
    """Every slice's own calibration: the HU window it implies, and whether the data set is windowed per slice."""

    windows: np.ndarray  # (N, 2) HU of grey 0 and 255 per surveyed slice; NaN where a slice lacks the landmarks
    air_visible: float  # share of surveyed slices whose air peak is above grey 0
    air_iqr: float  # interquartile range of the air peak's grey level over those slices
    width_iqr: float  # interquartile range of the implied window widths over their median
    fallback: Calibration  # the data set's calibration (median of the slices', or of its histogram)

    @property
    def failed(self) -> int:
        """Surveyed slices that lack the landmarks."""
        return int(np.isnan(self.windows[:, 0]).sum())

    @property
    def per_slice(self) -> bool:
        """Whether the slices look windowed each on its own: their air sits at different grey levels, or their
        implied windows spread (one window gives ~5-12% on the stand-ins, the noise of fat/soft-only estimates)."""
        return (self.air_visible >= 0.5 and self.air_iqr >= AIR_IQR) or self.width_iqr > WIDTH_IQR


def survey(x: np.ndarray, max_images: int = 400) -> Survey:
    """Calibrate up to max_images evenly spaced slices on their own (label-free)."""
    pick = evenly_spaced(x, max_images)
    found = [_slice_landmarks(s) for s in pick]
    cals = [c for _, c in found]
    windows = np.array([c.window() if c else (np.nan, np.nan) for c in cals]).reshape(-1, 2)
    airs = [a for a, _ in found if a is not None]
    ok = [c for c in cals if c]
    widths = windows[:, 1] - windows[:, 0]
    widths = widths[np.isfinite(widths)]
    if ok:
        fallback = Calibration(float(np.median([c.offset for c in ok])), float(np.median([c.scale for c in ok])))
    else:
        m = landmarks(histogram(x))
        fallback = Calibration(m.offset, m.scale)
    iqr = lambda v: float(np.subtract(*np.quantile(v, [0.75, 0.25]))) if len(v) else 0.0  # noqa: E731
    return Survey(windows, len(airs) / max(len(pick), 1), iqr(airs), iqr(widths) / float(np.median(widths)) if len(widths) else 0.0, fallback)
