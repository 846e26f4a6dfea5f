"""Network targets, encoded and decoded in one module: an instance map -> training targets (foreground, boundary,
distance, ids) with the augmentations that suit axial CT slices; network maps -> instances (upsampling, blending
members, watershed decoding)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import edt
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from comp.core.fields import added, bounded
from comp.data.images import SIZE
from comp.regions.ops import absorb_small, adjacent_pairs, merge_pairs, relabel_uint8, remove_small


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
    # Resolution (`resolution_amount`): half the samples blurred (Gaussian, sigma up to `blur` px), half sharpened
    # (unsharp mask, sigma SHARPEN_SIGMA, amount up to `sharpen`), so a network fitted on one scan's voxel size and
    # blur meets other sharpness; 0 and 0 (the default) draw nothing, leaving the random stream as it was.
    blur: float = bounded(0.0, lo=0, added=True)
    sharpen: float = bounded(0.0, lo=0, added=True)


SHARPEN_SIGMA = 2.0  # px: the scale an unsharp mask lifts (a 3 mm voxel stretched ~4x spans about 4 px)


def resolution_amount(cfg: AugConfig, rng: np.random.Generator) -> float:
    """A sample's resolution change: -sigma (a blur), +amount (a sharpening) or 0; draws nothing when both are off."""
    if cfg.blur <= 0 and cfg.sharpen <= 0:
        return 0.0
    blur = rng.random() < 0.5 if cfg.blur > 0 and cfg.sharpen > 0 else cfg.blur > 0
    return -rng.uniform(0, cfg.blur) if blur else rng.uniform(0, cfg.sharpen)


def resolve(img: np.ndarray, amount: float) -> np.ndarray:
    """One float image blurred (amount < 0: sigma -amount) or sharpened (amount > 0) as `resolution_amount` drew."""
    if amount < 0:
        return ndi.gaussian_filter(img, -amount, mode="reflect")
    if amount > 0:
        return img + amount * (img - ndi.gaussian_filter(img, SHARPEN_SIGMA, mode="reflect"))
    return img


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
    img = resolve(img, resolution_amount(cfg, rng))  # before the noise: a scanner blurs, then its quanta are counted
    if cfg.noise > 0:
        img = img + rng.normal(0, rng.uniform(0, cfg.noise), img.shape).astype(np.float32)
    return img.astype(np.float32), lab


# ----------------------------------------------------------------------------- decoding


@dataclass
class PostParams:
    """Every threshold of the map post-processor, with defaults (`comp tune` searches them)."""

    mode: str = "watershed"  # watershed | cc (connected components of the foreground only)
    fg_threshold: float = bounded(0.5, lo=0, hi=1)  # pixels above it are plausible structure and get a region
    seed_threshold: float = bounded(0.5, lo=0, hi=1)  # seeds: fg * (1 - boundary_weight * boundary) above this ...
    seed_dist: float = bounded(0.3, lo=0, hi=1)  # ... and distance-to-border map above this
    boundary_weight: float = bounded(1.0, lo=0)  # how much the boundary map lowers seed evidence
    min_seed: int = bounded(8, lo=0)  # pixels (at 512) a seed needs
    min_size: int = bounded(30, lo=0)  # regions below this join the neighbour they share the longest border with (or vanish if isolated)
    smooth: float = bounded(0.0, lo=0)  # Gaussian sigma applied to the maps before thresholding (pixels at 512)
    merge_embedding: float = bounded(0.0, lo=0)  # merge adjacent regions whose mean embeddings are closer (0 = off)
    compactness: float = bounded(0.0, lo=0)
    # threshold: seeds where the maps clear seed_threshold and seed_dist; maxima: every bump of the distance map at
    # least seed_h above its surroundings (off the boundary), wherever the map sits: a network fitted on another
    # patient predicts low distance peaks and leaves a third of the structures without a seed under fixed thresholds.
    seed_mode: str = added("threshold")
    seed_h: float = bounded(0.1, lo=0, lo_open=True, added=True)

    def violations(self) -> dict[str, str]:
        """An unknown seed mode."""
        return {} if self.seed_mode in SEED_MODES else {"seed_mode": f"must be one of {', '.join(SEED_MODES)}, got {self.seed_mode!r}"}


SEED_MODES = ("threshold", "maxima")


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel linear interpolation taps (as torch's bilinear, align_corners=False): lo, hi, weight of hi."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsample_maps(maps: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear resize of (C, r, r) maps to (C, size, size) float32.

    Plain numpy gathers (separable): as fast as torch's kernel here and, unlike any OpenMP code, safe in
    processes forked from a parent whose OpenMP pool is running (torch, LightGBM).
    """
    c, r, _ = maps.shape
    m = maps.astype(np.float32, copy=False)  # full-size float32 maps pass through without a copy
    if r == size:
        return m
    lo, hi, w = _linear_taps(r, size)
    rows = m[:, lo, :] * (1 - w)[None, :, None] + m[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w) + rows[:, :, hi] * w


def channels_used(p: PostParams, n: int) -> int:
    """How many of n map channels `instances_from_maps` reads under p: fg, boundary and distance, plus the embedding
    only when it merges by it (so forked workers are sent 3 channels, not 19)."""
    return n if p.merge_embedding > 0 else min(n, 3)


def seed_markers(fg: np.ndarray, bnd: np.ndarray, dist: np.ndarray, mask: np.ndarray, p: PostParams, min_seed: int) -> np.ndarray:
    """The watershed's markers: regions above fixed thresholds of at least `min_seed` pixels, or the distance map's
    h-maxima off the boundary (a maximum is a point or a small plateau: its depth h, not its size, says it is real)."""
    evidence = fg * (1 - p.boundary_weight * bnd)
    if p.seed_mode == "maxima":
        from skimage.morphology import h_maxima

        return ndi.label(h_maxima(dist.astype(np.float64), p.seed_h).astype(bool) & mask & (evidence > 0))[0]
    return remove_small(ndi.label((evidence > p.seed_threshold) & (dist > p.seed_dist) & mask)[0], min_seed)


def instances_from_maps(maps: np.ndarray, p: PostParams, size: int = SIZE) -> np.ndarray:
    """Turn (C, r, r) maps [fg prob, boundary prob, dist, embedding...] into a uint8 instance map."""
    m = upsample_maps(maps[:3], size)
    area = (size / SIZE) ** 2  # pixel-count parameters are given at the challenge size, 512x512
    if p.smooth > 0:
        sig = p.smooth * size / SIZE
        m = ndi.gaussian_filter(m, (0, sig, sig))
    fg, bnd, dist = m[0], m[1], m[2]
    mask = fg > p.fg_threshold
    if p.mode == "cc":
        return relabel_uint8(remove_small(ndi.label(mask)[0], max(1, round(p.min_size * area))))
    markers = seed_markers(fg, bnd, dist, mask, p, max(1, round(p.min_seed * area)))
    labels = watershed(bnd - dist, markers, mask=mask, compactness=p.compactness)
    # Foreground with no seed inside still counts as a structure: leaving it 0 is not free.
    orphans, n_orphan = ndi.label(mask & (labels == 0))
    if n_orphan:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    labels = absorb_small(labels, max(1, round(p.min_size * area)))
    if p.merge_embedding > 0 and maps.shape[0] > 3:
        emb = upsample_maps(maps[3:], size)
        pairs, _, _ = adjacent_pairs(labels)
        if len(pairs):
            n = int(labels.max()) + 1
            cnt = np.maximum(np.bincount(labels.ravel(), minlength=n), 1)
            mu = np.stack([np.bincount(labels.ravel(), weights=e.ravel(), minlength=n) / cnt for e in emb], 1)
            close = np.linalg.norm(mu[pairs[:, 0]] - mu[pairs[:, 1]], axis=1) < p.merge_embedding
            labels = merge_pairs(labels, pairs[close])
    return relabel_uint8(labels)


def blend(maps: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Members' (C, r, r) maps -> one: weighted mean of fg/boundary/dist, embeddings side by side (scaled by sqrt(w))."""
    used = [(m, w) for m, w in zip(maps, weights) if w > 0]
    if len(used) == 1:
        return used[0][0].astype(np.float32)
    res = max(m.shape[-1] for m, _ in used)
    total = sum(w for _, w in used)
    probs = sum(w * upsample_maps(m[:3], res) for m, w in used) / total
    # Embedding spaces of different models are unrelated: concatenating keeps each one's distances.
    embs = [np.sqrt(w / total) * upsample_maps(m[3:], res) for m, w in used if m.shape[0] > 3]
    return np.concatenate([probs, *embs]).astype(np.float32)
