"""Which merge variant narrows the tuned ensemble's per-slice loss (issue 23): the superpixel merger refitted on one
rendering's OOF under a variant and scored there, everything else as a tuned ensemble stored it.

The ensemble gives the post-processing and the superpixels (e.g. a scripts/per_slice_cross.py crossing tuned on the
same run). Variants: `base` (as tuned), `relative` (the RELATIVE border features on), `smoothS` (every slice smoothed
by a Gaussian of S pixels before superpixels and features: a test of the posterised steps). Scores are in-sample at
each listed threshold: a diagnostic to compare renderings, not a figure to select on.

Usage: .venv/bin/python scripts/per_slice_merge.py RUN ENSEMBLE [--runs DIR] [--variants base relative smooth0.7]
       [--thresholds 0.2 0.35 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from comp.data.dataset import Dataset
from comp.methods.merge import MergeKind, fit_region_merging
from comp.pipeline.ensemble import load_ensemble
from comp.pipeline.oof import OOF
from comp.pipeline.workspace import RunDir


def smoothed(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 slices after a Gaussian of `sigma` pixels, rounded once."""
    out = np.stack([ndi.gaussian_filter(im.astype(np.float32), sigma) for im in images])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main() -> None:
    """Fit and score each variant's superpixel merger; print a row per variant and threshold."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("ensemble")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/per_slice_cross"))
    ap.add_argument("--variants", nargs="+", default=["base", "relative", "smooth0.7"])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    a = ap.parse_args()
    data = Dataset(RunDir(a.run).summary()["dataset"]["root"])
    spec = load_ensemble(a.ensemble, a.runs)
    print("| data | variant | threshold | in-sample ARI |\n|---|---|---|---|")
    for v in a.variants:
        oof = OOF.load([a.run], data)
        if v.startswith("smooth"):
            oof.images = smoothed(oof.images, float(v[len("smooth"):]))
        merger = fit_region_merging(oof, [1.0], spec.regions, workers=2, kind=MergeKind(relative=v == "relative"))
        for t in a.thresholds:
            merger.threshold = t
            s = oof.scores([1.0], spec.post, merger, workers=2, regions=spec.regions)
            print(f"| {data.name} | {v} | {t} | {s.mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
