"""Contrast: the Hounsfield-to-grey mapping of the stand-ins, histogram landmarks, and the window step.

The challenge's slices behave like a wide CT window (about -1000..1000 HU to 0..255): soft tissues sit
within a few dozen grey levels of each other. Every method therefore runs behind a `contrast` step
(the experiment YAML's `contrast:` section): `none`, a fixed window in input grey levels, or `auto`,
which finds the fat and soft-tissue peaks of the data set's histogram, infers the grey level of any
Hounsfield value from them, and stretches a chosen HU window (soft tissue by default) to 0..255.
Networks may add further input channels with other windows (bone, a wider soft-tissue window).

Slices may also be windowed each on its own (the organisers' 2025 PNGs were: air anywhere in grey
0..110, 4-32 HU per grey level). `auto` surveys every slice's own landmarks first (`survey`): where the
windows they imply spread, each slice is calibrated from its own pixels (`slice_calibration`, far-apart
landmarks: the air outside the body, fat and soft tissue), re-rendered through the reference window
HU_WINDOW (`Contrast.canonical`), and every window is then given in those grey levels, so all methods
see every slice in the same HU units. A slice without the landmarks gets the data set's calibration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comp.core.errors import UserError
from comp.core.log import LOG
from comp.data.calibration import (CANONICAL, HU_WINDOW, Calibration, Survey, histogram, landmarks,
                                   slice_calibration, survey)


# The documented example of a window per slice: the low end drawn in -3100..-1000 HU, the high end in 1000..3100.
PER_SLICE_EXAMPLE = (-3100.0, -1000.0, 1000.0, 3100.0)


def window_ranges_problem(r) -> str | None:
    """What is wrong with [lo_from, lo_to, hi_from, hi_to] (a window per slice drawn from these ranges), or None."""
    if len(r) != 4:
        return f"needs two ranges (low end, high end), got {list(r)}"
    if not (r[0] <= r[1] and r[2] <= r[3]):
        return f"each range must run from low to high, got {r[0]:g}:{r[1]:g} {r[2]:g}:{r[3]:g}"
    if not r[1] < r[2]:
        return f"every low end must lie below every high end, got low ends up to {r[1]:g} and high ends from {r[2]:g}"
    return None


def draw_windows(r, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) HU windows, each end uniform in its range."""
    return np.stack([rng.uniform(r[0], r[1], n), rng.uniform(r[2], r[3], n)], axis=1)


def hu_to_grey(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    """Map Hounsfield units in [lo, hi] linearly to uint8 0..255 (lo -> 0, hi -> 255, rounded, clipped)."""
    return np.clip(np.rint((np.asarray(hu, np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)




@dataclass
class ContrastParams:
    """The `contrast:` section of an experiment: how input grey levels are windowed before a method sees them."""

    window: Any = "none"  # none | auto | [lo, hi] in input grey levels (lo -> 0, hi -> 255)
    hu: list[float] = field(default_factory=lambda: [-350.0, 450.0])  # the HU window `auto` stretches to 0..255
    channels: list[list[float]] = field(default_factory=list)  # networks: extra input windows, in HU (via the calibration)
    per_slice: Any = "auto"  # auto | true | false: calibrate each slice on its own (auto: where the slices' windows spread)

    def violations(self) -> dict[str, str]:
        """The choices no range states."""
        return {} if self.per_slice in ("auto", True, False) else {"per_slice": f"must be auto, true or false, got {self.per_slice!r}"}


@dataclass(frozen=True)
class Contrast:
    """A contrast step resolved for one data set: windows in input grey levels, or (per slice) in the grey levels of
    each slice re-rendered through HU_WINDOW by its own calibration."""

    window: tuple[float, float] = (0.0, 255.0)
    channels: tuple[tuple[float, float], ...] = ()
    per_slice: Calibration | None = None  # set: slices are calibrated one by one; this is the data set's, for slices without landmarks

    def _per_slice(self, x: np.ndarray, out_grey) -> np.ndarray:
        """Each slice through its own lookup table: out_grey of its grey levels' float reference-rendering levels
        (HU_WINDOW), rounded once."""
        g = np.arange(256, dtype=np.float64)
        out = np.empty_like(x)
        for i, s in enumerate(x):
            c = slice_calibration(s) or self.per_slice
            out[i] = np.clip(np.rint(out_grey(CANONICAL.grey(c.hu(g)))), 0, 255).astype(np.uint8)[s]
        return out

    def canonical(self, x: np.ndarray) -> np.ndarray:
        """The slices every method reads: per slice, re-rendered through HU_WINDOW by its own calibration; else as given."""
        return x if self.per_slice is None else self._per_slice(x, lambda v: v)

    def stretch(self, x: np.ndarray) -> np.ndarray:
        """uint8 slices with the window stretched to 0..255 (a lookup table per slice, or one; identity for none)."""
        lo, hi = self.window
        if self.per_slice is not None:
            return self._per_slice(x, lambda v: (v - lo) / (hi - lo) * 255.0)
        if self.window == (0.0, 255.0):
            return x
        lut = np.clip(np.rint((np.arange(256) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        return lut[x]

    def with_window(self, window: tuple[float, float]) -> "Contrast":
        """The same step with another main window (a tuned one), in the same grey levels."""
        return dataclasses.replace(self, window=(float(window[0]), float(window[1])))

    def unit_affine(self) -> tuple[float, float]:
        """(a, b) with a * x/255 + b = 0 at the window's low end and 1 at its high end (unclipped), x the canonical slice."""
        lo, hi = self.window
        return 255.0 / (hi - lo), -lo / (hi - lo)

    def stem_windows(self) -> tuple[tuple[float, float], ...]:
        """Every network input channel as (low, high) in the main window's units: the main one is (0, 1)."""
        lo, hi = self.window
        return ((0.0, 1.0),) + tuple(((a - lo) / (hi - lo), (b - lo) / (hi - lo)) for a, b in self.channels)

    def to_dict(self) -> dict:
        """Plain data, as stored in a run's config."""
        d = {"window": [round(v, 4) for v in self.window], "channels": [[round(v, 4) for v in c] for c in self.channels]}
        if self.per_slice is not None:
            d["per_slice"] = [self.per_slice.offset, self.per_slice.scale]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Contrast":
        """Inverse of to_dict (an absent entry means no contrast step)."""
        if not d:
            return cls()
        cal = Calibration(*(float(v) for v in d["per_slice"])) if d.get("per_slice") else None
        return cls(tuple(float(v) for v in d["window"]), tuple(tuple(float(v) for v in c) for c in d.get("channels", [])), cal)


def _window(value: Any, where: str, key: str) -> tuple[float, float]:
    """A [lo, hi] pair with lo < hi, or a clear error naming the key."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not float(value[0]) < float(value[1]):
        raise UserError(where, f"'{key}' must be none, auto or [lo, hi] with lo < hi, got {value!r}")
    return float(value[0]), float(value[1])


def calibration(x: np.ndarray, per_slice: Any = "auto", where: str = "contrast", say=LOG.info) -> tuple[Calibration | None, Calibration]:
    """How a data set's slices are read: (the data set's calibration where each slice is calibrated on its own, else
    None; the calibration of the slices as the methods then read them: the reference rendering's, or the data set's)."""
    sv = survey(x)
    if per_slice is True or (per_slice == "auto" and sv.per_slice):
        say(f"contrast: slices calibrated one by one (air grey IQR {sv.air_iqr:.1f}, window width IQR {100 * sv.width_iqr:.0f}%); "
            f"{sv.failed} of {len(sv.windows)} surveyed slices lack landmarks and take the data set's calibration")  # fmt: skip
        return sv.fallback, CANONICAL
    return None, _one_window(x, sv, where, say)


def _one_window(x: np.ndarray, sv: Survey, where: str, say=LOG.info) -> Calibration:
    """One window for every slice: the data set's histogram landmarks, unless most slices' own (far-apart) landmarks
    imply a scale off by more than AGREE from theirs (a wide window puts the air where the histogram's tissue search
    starts); then the median of the slices' calibrations."""
    try:
        hist = landmarks(histogram(x), where)
    except UserError:
        hist = None
    if sv.failed > len(sv.windows) / 2:  # too few slices calibrated to second-guess the histogram
        if hist is None:
            raise UserError(where, "cannot find fat and soft-tissue peaks in the grey-level histogram; give contrast.window as [lo, hi]")
        return hist
    if hist is not None and abs(hist.scale / sv.fallback.scale - 1) <= AGREE:
        return hist
    say(f"contrast: the histogram's landmarks imply {_per_grey(hist)} HU per grey level, the slices' own "
        f"{1 / sv.fallback.scale:.1f}: using the slices' (median of {len(sv.windows) - sv.failed})")  # fmt: skip
    return sv.fallback


def _per_grey(c: Calibration | None) -> str:
    """HU per grey level of a calibration, or 'no'."""
    return "no" if c is None else f"{1 / c.scale:.1f}"


AGREE = 0.25  # one window: histogram and slice calibrations agree within 2% on the one-window stand-ins


def rendered_as(x: np.ndarray, per_slice: Calibration | None, cal: Calibration, to: Calibration) -> np.ndarray:
    """Another data set's slices (read through `calibration(x)` = (per_slice, cal)) in the grey levels of the
    calibration `to` (a data set's `calibration(...)[1]`): extra training slices in the units its methods read."""
    g = np.arange(256, dtype=np.float64)
    if per_slice is not None:
        return Contrast(per_slice=per_slice)._per_slice(x, lambda v: to.grey(CANONICAL.hu(v)))
    return np.clip(np.rint(to.grey(cal.hu(g))), 0, 255).astype(np.uint8)[x]


def resolve(p: ContrastParams, x: np.ndarray, where: str = "contrast", say=LOG.info) -> Contrast:
    """Resolve the contrast section on a data set's slices (`auto` and HU channels read its pixels, never labels).

    Calibrated steps survey the slices first; windowed per slice (or told `per_slice: true`), each slice is then
    calibrated on its own and the windows are given in the reference rendering's grey levels."""
    needs_calibration = p.window == "auto" or bool(p.channels)
    hu_lo, hu_hi = _window(p.hu, where, "contrast.hu")
    per_slice, cal = calibration(x, p.per_slice, where, say) if needs_calibration else (None, None)
    if p.window in ("none", None):
        window = (0.0, 255.0)
    elif p.window == "auto":
        window = (cal.grey(hu_lo), cal.grey(hu_hi))
    else:
        window = _window(p.window, where, "contrast.window")
    channels = tuple((cal.grey(a), cal.grey(b)) for a, b in (_window(c, where, "contrast.channels") for c in p.channels))
    return Contrast((round(window[0], 4), round(window[1], 4)), tuple((round(a, 4), round(b, 4)) for a, b in channels), per_slice)
