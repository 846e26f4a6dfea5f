"""Training targets from an instance map, and augmentations that suit axial CT slices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import edt
import numpy as np
from scipy import ndimage as ndi

from comp.fields import bounded


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Area-average a (H, W) uint8 slice to (size, size) float32 in [0, 1]."""
    h = img.shape[0]
    x = img.astype(np.float32) / 255.0
    if h == size:
        return x
    if h % size == 0:
        f = h // size
        return x.reshape(size, f, size, f).mean(axis=(1, 3))
    return ndi.zoom(x, size / h, order=1)


def resize_labels(lab: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an instance map to (size, size), sampling pixel centres."""
    h = lab.shape[0]
    if h == size:
        return lab
    idx = ((np.arange(size) + 0.5) * h / size).astype(np.intp)
    return lab[np.ix_(idx, idx)]


@dataclass
class Targets:
    """Per-pixel targets at working resolution, compact: a loader's batches (and /dev/shm under workers) carry bytes;
    the loss converts them on the device."""

    fg: np.ndarray  # uint8 {0, 1}
    boundary: np.ndarray  # uint8 {0, 1}: contours of structures, touching borders included
    touch: np.ndarray  # uint8 {0, 1}: borders where two structures meet with no gap
    dist: np.ndarray  # float32 [0, 1]: distance to the structure's border, 1 at its centre
    instances: np.ndarray  # the instance map's own ids (uint8), 0 = not annotated


def make_targets(lab: np.ndarray, width: int = 1) -> Targets:
    """Foreground, boundary, touching-border and normalised-distance targets of one instance map."""
    size = 2 * width + 1
    fg = lab > 0
    hi = ndi.maximum_filter(lab, size=size)
    lo_any = ndi.minimum_filter(lab, size=size)  # 0 when background is near
    lo_fg = ndi.minimum_filter(np.where(fg, lab, 255).astype(lab.dtype), size=size)  # background ignored
    boundary = fg & ((hi > lab) | (lo_any < lab))
    touch = fg & ((hi > lab) | (lo_fg < lab))  # a different structure, not background, is adjacent
    interior = fg & ~boundary
    d = edt.edt(interior, black_border=False, parallel=1)  # exact, float32: scipy's values, ~3x faster
    n = int(lab.max())
    if n:
        peak = np.zeros(n + 1, np.float32)
        np.maximum.at(peak, lab.ravel(), d.ravel())  # each structure's deepest pixel
        peak[peak == 0] = 1.0
        d = d / peak[lab]
    return Targets(fg=fg.view(np.uint8), boundary=boundary.view(np.uint8), touch=touch.view(np.uint8),
                   dist=np.clip(d, 0, 1), instances=lab)  # fmt: skip


@dataclass
class AugConfig:
    """Augmentations for axial CT: any orientation, mild scale, window/contrast changes and noise."""

    rot90: bool = True
    flip: bool = True
    rotate_deg: float = bounded(20.0, lo=0, hi=180)
    scale: float = bounded(0.15, lo=0, hi=1, hi_open=True)  # zoom in [1 - scale, 1 + scale]
    contrast: float = bounded(0.2, lo=0, hi=1, hi_open=True)
    brightness: float = bounded(0.08, lo=0)
    gamma: float = bounded(0.25, lo=0, hi=1, hi_open=True)
    noise: float = bounded(0.03, lo=0)
    p: float = bounded(1.0, lo=0, hi=1)  # probability of augmenting a sample at all


def augment(img: np.ndarray, lab: np.ndarray, cfg: AugConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transform a (float image, instance map) pair the same way; intensity changes on the image only."""
    if rng.random() >= cfg.p:
        return img, lab
    if cfg.rot90:
        k = int(rng.integers(4))
        img, lab = np.rot90(img, k), np.rot90(lab, k)
    if cfg.flip and rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if cfg.rotate_deg > 0 or cfg.scale > 0:
        th = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        s = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
        c, si = math.cos(th) / s, math.sin(th) / s
        m = np.array([[c, -si], [si, c]])
        centre = (np.array(img.shape) - 1) / 2
        off = centre - m @ centre
        img = ndi.affine_transform(np.ascontiguousarray(img), m, off, order=1, mode="constant", cval=float(img.min()))
        lab = ndi.affine_transform(np.ascontiguousarray(lab), m, off, order=0, mode="constant", cval=0)
    img = np.ascontiguousarray(img, np.float32)
    lab = np.ascontiguousarray(lab)
    if cfg.gamma > 0:
        # Gamma bends the window's 0..1 range; values outside it (air, bone beyond the window) keep their offset.
        inside = np.clip(img, 0, 1)
        img = img - inside + inside ** math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    if cfg.contrast > 0 or cfg.brightness > 0:
        mean = float(img.mean())
        img = (img - mean) * (1 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean + rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.noise > 0:
        img = img + rng.normal(0, rng.uniform(0, cfg.noise), img.shape).astype(np.float32)
    return img.astype(np.float32), lab
