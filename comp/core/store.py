"""On-disk stores below a run: a fold's folder (checkpoints, history, merger) and quantised map arrays.

Cached maps are stored as uint8 with a float32 offset and step per image and channel: a quarter of
float32 and half of float16, within half a step (<= 0.2% of a channel's range in that image) of the
values. Files written before that (plain float16) still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from comp.core.atomic import atomic_path, atomic_save_npy
from comp.core.errors import UserError
from comp.core.log import progress


class MapArray:
    """Cached (N, C, r, r) maps, quantised or not; indexing decodes to float32, the file stays memory-mapped."""

    def __init__(self, values: np.ndarray, scale: np.ndarray | None = None) -> None:
        self.values, self.scale = values, scale  # scale: (N, C, 2) float32 offset and step, None for float maps

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, r, r)."""
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[np.ndarray]:
        """One image's decoded maps at a time."""
        return (self[i] for i in range(len(self)))

    def first_channels(self, k: int) -> "MapArray":
        """The same maps cut to their first k channels, still lazy (memory-mapped views, nothing decoded)."""
        return MapArray(self.values[:, :k], None if self.scale is None else self.scale[:, :k])

    def __getitem__(self, i: int | slice | np.ndarray) -> np.ndarray:
        """Maps of one image (C, r, r) or of several (n, C, r, r), as float32."""
        v = np.asarray(self.values[i], np.float32)
        if self.scale is None:
            return v
        s = self.scale[i]
        return v * s[..., 1, None, None] + s[..., 0, None, None]


def quantise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, r, r) float maps -> uint8 codes and (N, C, 2) float32 [offset, step] per image and channel.

    One float32 copy, every step in place on it; NaN and infinities (a channel whose min or max is not finite) are
    zeroed/clamped only in the channels that have them: about half the time of a whole-array nan_to_num and fresh
    arrays per step, with the same codes (`make bench` times both)."""
    m = np.array(maps, np.float32)
    lo, hi = m.min(axis=(2, 3)), m.max(axis=(2, 3))
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        m[bad] = np.nan_to_num(m[bad])
        lo, hi = m.min(axis=(2, 3)), m.max(axis=(2, 3))
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    np.subtract(m, lo[..., None, None], out=m)
    np.divide(m, step[..., None, None], out=m)
    np.rint(m, out=m)
    np.clip(m, 0, 255, out=m)
    return m.astype(np.uint8), np.stack([lo, step], -1).astype(np.float32)


def _scale_path(path: Path) -> Path:
    """fold0_maps.npy -> fold0_maps_scale.npy."""
    return path.with_name(path.stem + "_scale.npy")


def save_maps(path: Path, maps: np.ndarray) -> None:
    """Write maps quantised (the scale file first: the maps file's presence means both are complete)."""
    codes, scale = quantise(maps)
    atomic_save_npy(_scale_path(path), scale)
    atomic_save_npy(path, codes)


def write_maps(path: Path, n: int, predict: Callable[[slice], np.ndarray], chunk: int = 64) -> None:
    """Predict n slices a chunk at a time straight into a quantised maps file: memory independent of n."""
    scale, codes = None, None
    with atomic_path(path, suffix=".npy") as tmp:
        for c0 in progress(range(0, n, chunk), n <= chunk, desc=f"maps -> {path.name}", leave=False):
            sl = slice(c0, min(n, c0 + chunk))
            q, s = quantise(predict(sl))
            if codes is None:
                codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *q.shape[1:]))
                scale = np.empty((n, *s.shape[1:]), np.float32)
            codes[sl], scale[sl] = q, s
        if codes is None:
            raise UserError(path, "no slices to predict")
        codes.flush()
        del codes
        atomic_save_npy(_scale_path(path), scale)


def load_maps(path: Path) -> MapArray:
    """A cached maps file, memory-mapped (forked workers share its pages)."""
    values = np.load(path, mmap_mode="r")
    scale_file = _scale_path(path)
    if values.dtype == np.uint8:
        if not scale_file.is_file():
            raise UserError(scale_file, "missing: the quantised maps beside it cannot be read")
        return MapArray(values, np.load(scale_file))
    return MapArray(values)


@dataclass(frozen=True)
class FoldDir:
    """A fold's work folder (a CV fold, a fit on every annotated slice, or a pretraining): what is kept there."""

    path: Path

    @property
    def last(self) -> Path:
        """The full training checkpoint a killed fold resumes from."""
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        """The selected epoch's weights: what a trained fold predicts with."""
        return self.path / "best.pt"

    @property
    def history(self) -> Path:
        """Per-epoch losses and validation scores (the report's curves)."""
        return self.path / "history.json"

    @property
    def merger(self) -> Path:
        """A hybrid's fitted region merger."""
        return self.path / "merge.txt"
