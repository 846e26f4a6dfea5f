"""Maps and a slice -> uint8 regions: decoding or superpixels, then optional learned merging."""

from __future__ import annotations

import numpy as np

from comp.nets.targets import PostParams, instances_from_maps, upsample_maps
from comp.regions.superpixels import Merger, Regions, merged_superpixels


def segment(maps: np.ndarray, image: np.ndarray, post: PostParams, merger: "Merger | None" = None, fold: int = -1,
            regions: Regions | None = None, given: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Blended maps -> uint8 instance map: watershed post-processing (or superpixels, or `given` regions), then
    optional learned merging."""
    maps = upsample_maps(maps, image.shape[-1])  # once, shared by the post-processor and the merger
    if regions is not None:
        return merged_superpixels(regions.stretch(image), image, regions.superpixels, merger, maps, fold, given)
    labels = instances_from_maps(maps, post, image.shape[-1])
    return merger.apply(labels, maps, image, fold) if merger is not None else labels
