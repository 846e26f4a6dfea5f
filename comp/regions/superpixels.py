"""Superpixels of a slice (watershed of its gradient) and the regions a merger joins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from comp.core.fields import bounded
from comp.data.contrast import Contrast
from comp.regions.ops import relabel_uint8


class Merger(Protocol):
    """What segment() asks of a region merger (comp.methods.merge.Merger, which builds on this module)."""

    def apply(self, labels: np.ndarray, maps: np.ndarray | None, image: np.ndarray, fold: int = -1,
              raw: np.ndarray | None = None) -> np.ndarray: ...  # fmt: skip


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
