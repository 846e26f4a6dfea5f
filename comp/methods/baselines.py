"""Non-learned methods: the official watershed baseline and a smoothed, merged, fold-fitted variant.

Both run on the slices after the experiment's contrast step (identity for the official recipe), and
declare the parameters `comp tune` searches together with the contrast window.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import rank, sobel
from skimage.morphology import disk
from skimage.segmentation import watershed

from comp.core.fields import bounded
from comp.core.metric import image_score
from comp.core.parallel import pmap
from comp.data.contrast import Contrast
from comp.methods.base import FitContext, FoldData
from comp.methods.registry import register_method
from comp.regions.ops import adjacent_pairs, merge_pairs, region_means, relabel_uint8, remove_small


@dataclass
class OfficialWatershedParams:
    """Parameters of the organisers' baseline (defaults are theirs)."""

    median_radius: int = bounded(2, lo=0)
    gradient_radius: int = bounded(5, lo=1)
    marker_threshold: int = bounded(20, lo=0, hi=255)
    compactness: float = bounded(0.0001, lo=0)
    workers: int = bounded(0, lo=0)  # 0 = all cores


def official_watershed(img: np.ndarray, p: OfficialWatershedParams) -> np.ndarray:
    """The organisers' baseline: Sobel edges, median-denoised gradient markers, watershed."""
    edges = sobel(img)
    denoised = rank.median(img, disk(p.median_radius))
    markers = ndi.label(rank.gradient(denoised, disk(p.gradient_radius)) < p.marker_threshold)[0]
    return relabel_uint8(watershed(edges, markers, compactness=p.compactness))


OFFICIAL_SPACE = {"median_radius": (1, 4, False), "gradient_radius": (2, 8, False), "marker_threshold": (4, 60, True)}


@register_method("official_watershed", OfficialWatershedParams, OFFICIAL_SPACE)
class OfficialWatershed:
    """Fixed pipeline: nothing to fit but the contrast step it runs behind."""

    def __init__(self, params: OfficialWatershedParams) -> None:
        self.p = params
        self.contrast = Contrast()

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Nothing to fit: keep the resolved contrast step."""
        self.contrast = ctx.contrast

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the baseline on every (contrast-stretched) slice."""
        return np.stack(pmap(official_watershed, self.contrast.stretch(x), self.p, workers=self.p.workers))


@dataclass
class SmoothWatershedParams:
    """Smoothed-gradient watershed with intensity merging; the grids are searched on each training fold."""

    sigma: float = bounded(1.5, lo=0)
    marker_threshold: float = bounded(0.02, lo=0, lo_open=True)  # on the Sobel gradient of the smoothed image (intensities in 0..1)
    min_marker: int = bounded(20, lo=0)
    merge_delta: float = bounded(10.0, lo=0)  # merge adjacent regions whose mean grey levels differ by less
    merge_edge: float = bounded(0.05, lo=0)  # ... and whose shared border has a mean gradient below this
    min_size: int = bounded(30, lo=0)
    background_below: int = bounded(40, lo=0, hi=256)  # slices' air: pixels darker than this stay 0 (never annotated)
    fit_marker_thresholds: list[float] = bounded(factory=lambda: [0.01, 0.02, 0.04], lo=0, lo_open=True, min_len=1)
    fit_merge_deltas: list[float] = bounded(factory=lambda: [0.0, 8.0, 16.0], lo=0, min_len=1)
    fit_images: int = bounded(24, lo=0)  # 0 = no search: marker_threshold and merge_delta as given (tuned settings)
    workers: int = bounded(0, lo=0)


def smooth_watershed(img: np.ndarray, p: SmoothWatershedParams) -> np.ndarray:
    """Watershed of the smoothed gradient from flat-region markers, then merge look-alike neighbours."""
    smooth = ndi.gaussian_filter(img.astype(np.float32) / 255.0, p.sigma)
    grad = sobel(smooth)
    markers = remove_small(ndi.label(grad < p.marker_threshold)[0], p.min_marker)
    mask = img >= p.background_below
    labels = watershed(grad, markers, mask=mask)
    if p.merge_delta > 0:
        pairs, length, total = adjacent_pairs(labels, grad)
        means = region_means(labels, smooth * 255.0)
        close = np.abs(means[pairs[:, 0]] - means[pairs[:, 1]]) < p.merge_delta
        weak = total / np.maximum(length, 1) < p.merge_edge
        labels = merge_pairs(labels, pairs[close & weak])
    return relabel_uint8(remove_small(labels, p.min_size))


def _grid_score(args: tuple) -> float:
    """Mean score of one parameter set on a handful of images (a pool job)."""
    p, xs, ys = args
    return float(np.mean([image_score(y, smooth_watershed(x, p)) for x, y in zip(xs, ys)]))


SMOOTH_SPACE = {
    "sigma": (0.5, 3.0, False),
    "marker_threshold": (0.003, 0.08, True),
    "merge_delta": (0.0, 24.0, False),
    "merge_edge": (0.01, 0.2, True),
    "min_size": (5, 200, True),
    "background_below": (5, 80, False),
}


@register_method("smooth_watershed", SmoothWatershedParams, SMOOTH_SPACE, {"fit_images": 0})
class SmoothWatershed:
    """Non-learned, but its marker threshold and merge tolerance are chosen on the training fold only."""

    def __init__(self, params: SmoothWatershedParams) -> None:
        self.p = params
        self.contrast = Contrast()

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Grid-search marker threshold x merge tolerance on a subset of the (contrast-stretched) training fold."""
        self.contrast = ctx.contrast
        if self.p.fit_images <= 0 or len(train.x) == 0:
            return
        rng = np.random.default_rng(ctx.seed)
        pick = rng.choice(len(train.x), min(self.p.fit_images, len(train.x)), replace=False)
        xs, ys = self.contrast.stretch(train.x[pick]), train.y[pick]
        grid = [
            replace(self.p, marker_threshold=t, merge_delta=d)
            for t, d in itertools.product(self.p.fit_marker_thresholds, self.p.fit_merge_deltas)
        ]
        scores = pmap(_grid_score, [(g, xs, ys) for g in grid], workers=self.p.workers)
        self.p = grid[int(np.argmax(scores))]
        self.fitted = {"marker_threshold": self.p.marker_threshold, "merge_delta": self.p.merge_delta}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the pipeline with the fitted parameters on the contrast-stretched slices."""
        return np.stack(pmap(smooth_watershed, self.contrast.stretch(x), self.p, workers=self.p.workers))
