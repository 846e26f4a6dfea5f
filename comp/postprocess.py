"""Region-level building blocks shared by every method: relabelling, adjacency, merging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from comp.contrast import Contrast
from comp.fields import bounded

class Merger(Protocol):
    """What segment() asks of a region merger (comp.merge.Merger, which builds on this module)."""

    def apply(self, labels: np.ndarray, maps: np.ndarray | None, image: np.ndarray, fold: int = -1,
              raw: np.ndarray | None = None) -> np.ndarray: ...  # fmt: skip


def relabel_uint8(labels: np.ndarray, keep_zero: bool = True) -> np.ndarray:
    """Sequential uint8 ids; past 255 regions the smallest ones join their nearest kept region."""
    lab = np.asarray(labels)
    ids, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    inv = inv.reshape(lab.shape)
    has_zero = keep_zero and ids[0] == 0
    fg = np.arange(1 if has_zero else 0, len(ids))
    if len(fg) <= 255:
        lut = np.zeros(len(ids), np.uint8)
        lut[fg] = np.arange(1, len(fg) + 1)
        return lut[inv]
    keep = fg[np.argsort(-counts[fg], kind="stable")[:255]]
    lut = np.zeros(len(ids), np.uint8)
    lut[keep] = np.arange(1, 256)
    out = lut[inv]
    dropped = np.isin(inv, fg) & (out == 0)
    # Each dropped pixel takes the id of the nearest kept pixel (distance transform indices).
    _, (iy, ix) = ndi.distance_transform_edt(out == 0, return_indices=True)
    out[dropped] = out[iy[dropped], ix[dropped]]
    return out


def _crossings(labels: np.ndarray, values: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 4-neighbour step between two non-zero regions: pair index (into the sorted pairs), the mean of
    `values` on its two sides (0 without values), and the pairs (a < b) themselves."""
    lab = labels.astype(np.int64)
    n = int(lab.max()) + 1
    keys, vals = [], []
    for a, b, va, vb in (
        (lab[:, :-1], lab[:, 1:], *((values[:, :-1], values[:, 1:]) if values is not None else (None, None))),
        (lab[:-1, :], lab[1:, :], *((values[:-1, :], values[1:, :]) if values is not None else (None, None))),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        keys.append(lo * n + hi)
        vals.append(0.5 * (va[m] + vb[m]) if values is not None else np.zeros(len(lo)))
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    return inv, np.concatenate(vals), np.stack([uniq // n, uniq % n], axis=1)


def adjacent_pairs(labels: np.ndarray, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) of 4-adjacent non-zero regions, their shared border length and the sum of `values` on it."""
    inv, vals, pairs = _crossings(labels, values)
    return pairs, *_length_total(inv, vals, len(pairs))


def _length_total(inv: np.ndarray, vals: np.ndarray, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Border length (steps) and sum of values per pair, from _crossings."""
    length = np.bincount(inv, minlength=n_pairs).astype(np.float64)
    return length, np.bincount(inv, weights=vals, minlength=n_pairs) if len(vals) else np.zeros(0)


def border_profile(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """adjacent_pairs, plus the max and min of `values` along each shared border, from one scan of the image."""
    inv, vals, pairs = _crossings(labels, values)
    length, total = _length_total(inv, vals, len(pairs))
    hi, lo = np.full(len(pairs), -np.inf), np.full(len(pairs), np.inf)
    np.maximum.at(hi, inv, vals)
    np.minimum.at(lo, inv, vals)
    return pairs, length, total, hi, lo


def merge_pairs(labels: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Merge the regions joined by `pairs` (transitively); ids stay in the input's id space."""
    if len(pairs) == 0:
        return labels
    n = int(labels.max()) + 1
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    # Each component is named by its smallest id so region 0 (unlabelled) stays 0.
    root = np.full(comp.max() + 1, n, np.int64)
    np.minimum.at(root, comp, np.arange(n))
    return root[comp][labels]


def region_means(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Mean of `image` over each region id (index = id)."""
    n = int(labels.max()) + 1
    cnt = np.bincount(labels.ravel(), minlength=n)
    tot = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64), minlength=n)
    return tot / np.maximum(cnt, 1)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set regions smaller than `min_size` pixels to 0."""
    if min_size <= 1:
        return labels
    cnt = np.bincount(labels.ravel())
    small = cnt < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


@dataclass
class SuperpixelParams:
    """An over-segmentation of a (contrast-stretched) slice: watershed of its smoothed gradient from h-minima."""

    sigma: float = bounded(1.0, lo=0)  # Gaussian smoothing before the gradient (pixels at 512)
    h: float = bounded(0.005, lo=0, lo_open=True)  # depth a gradient minimum needs to seed a superpixel (gradient of 0..1 intensities)
    compactness: float = bounded(0.0, lo=0)


def gradient(image: np.ndarray, sigma: float) -> np.ndarray:
    """Sobel gradient magnitude of a uint8 slice (as 0..1 intensities) after Gaussian smoothing."""
    from skimage.filters import sobel

    return sobel(ndi.gaussian_filter(image.astype(np.float32) / 255.0, sigma))


def superpixels(image: np.ndarray, p: SuperpixelParams, grad: np.ndarray | None = None) -> np.ndarray:
    """Label map (1..n, every pixel labelled) of a fine over-segmentation; about 1,000 regions at the defaults."""
    from skimage.morphology import h_minima

    g = gradient(image, p.sigma) if grad is None else grad
    markers = ndi.label(h_minima(g, p.h))[0]
    return watershed(g, markers, compactness=p.compactness).astype(np.int32)


@dataclass
class Regions:
    """What a merger starts from instead of the maps' watershed: superpixels of the contrast-stretched slice, or
    (with `run`) a CV run's own instance predictions (of its fold models on OOF images, of its fit on every
    annotated slice on the test set)."""

    superpixels: SuperpixelParams = field(default_factory=SuperpixelParams)
    window: list[float] = bounded(factory=lambda: [0.0, 255.0], min_len=2, max_len=2)  # grey levels stretched to 0..255 first
    run: str = ""  # the run whose predictions are the regions ("" = superpixels)

    def stretch(self, image: np.ndarray) -> np.ndarray:
        """The slice behind this window."""
        return Contrast((float(self.window[0]), float(self.window[1]))).stretch(image)


def merged_superpixels(stretched: np.ndarray, raw: np.ndarray, sp: SuperpixelParams, merger: "Merger | None",
                       maps512: np.ndarray | None = None, fold: int = -1, given: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The hybrid: superpixels of a stretched slice (or `given` regions) merged by a pair classifier (learned maps
    as features, if any)."""
    labels = superpixels(stretched, sp) if given is None else given
    return merger.apply(labels, maps512, stretched, fold, raw=raw) if merger is not None else relabel_uint8(labels)


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


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel linear interpolation taps (as torch's bilinear, align_corners=False): lo, hi, weight of hi."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsample_maps(maps: np.ndarray, size: int = 512) -> np.ndarray:
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


def instances_from_maps(maps: np.ndarray, p: PostParams, size: int = 512) -> np.ndarray:
    """Turn (C, r, r) maps [fg prob, boundary prob, dist, embedding...] into a uint8 instance map."""
    m = upsample_maps(maps[:3], size)
    area = (size / 512) ** 2  # pixel-count parameters are given at 512x512
    if p.smooth > 0:
        sig = p.smooth * size / 512
        m = ndi.gaussian_filter(m, (0, sig, sig))
    fg, bnd, dist = m[0], m[1], m[2]
    mask = fg > p.fg_threshold
    if p.mode == "cc":
        return relabel_uint8(remove_small(ndi.label(mask)[0], max(1, round(p.min_size * area))))
    evidence = fg * (1 - p.boundary_weight * bnd)
    seeds = (evidence > p.seed_threshold) & (dist > p.seed_dist) & mask
    markers = remove_small(ndi.label(seeds)[0], max(1, round(p.min_seed * area)))
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


def absorb_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Regions below `min_size` pixels take the id of the (not small) neighbour with the longest shared border, or vanish if none."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    cnt = np.bincount(labels.ravel())
    small = np.flatnonzero((cnt < min_size) & (cnt > 0))
    small = small[small > 0]
    if len(small) == 0:
        return labels
    pairs, length, _ = adjacent_pairs(labels)
    target = np.arange(len(cnt))
    is_small = np.zeros(len(cnt), bool)
    is_small[small] = True
    for s in small:
        rows = np.flatnonzero((pairs[:, 0] == s) | (pairs[:, 1] == s))
        nb = np.where(pairs[rows, 0] == s, pairs[rows, 1], pairs[rows, 0])
        ok = ~is_small[nb]
        target[s] = nb[ok][np.argmax(length[rows][ok])] if ok.any() else 0
    return target[labels]


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


def segment(maps: np.ndarray, image: np.ndarray, post: PostParams, merger: "Merger | None" = None, fold: int = -1,
            regions: Regions | None = None, given: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Blended maps -> uint8 instance map: watershed post-processing (or superpixels, or `given` regions), then
    optional learned merging."""
    maps = upsample_maps(maps, image.shape[-1])  # once, shared by the post-processor and the merger
    if regions is not None:
        return merged_superpixels(regions.stretch(image), image, regions.superpixels, merger, maps, fold, given)
    labels = instances_from_maps(maps, post, image.shape[-1])
    return merger.apply(labels, maps, image, fold) if merger is not None else labels
