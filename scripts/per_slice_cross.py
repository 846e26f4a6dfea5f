"""Where the tuned ensemble's per-slice loss comes from (issue 23): its maps or the slices it merges.

The one-window and per-slice proxies hold the same slices in the same order and folds, rendered two ways. This
tunes the results suite's ensemble (one network's maps, superpixels merged by LightGBM, 12 trials, no other run's
regions) on each crossing: maps of the run on one rendering, superpixels and merge features of the slices of the
other (and the superpixels' contrast window the slices' run resolved). If the loss follows the slices, the merging is what the per-slice rendering costs; if the maps, the network.

Usage: .venv/bin/python scripts/per_slice_cross.py ONE_WINDOW_RUN PER_SLICE_RUN [--trials 12] [--runs DIR]
       [--depths H ...] [--only "one window:per slice" ...] [--relative-features] [--posterize Q [--smooth SIGMA | --dither]]
(the two CV runs of one experiment, e.g. unet_cpu_pseudo on data/proxy and data/proxy_ps). Prints a table.
`--depths`: the superpixel depths the tuning may pick among (default: the tuning's own, comp.pipeline.tune.SUPERPIXEL_H);
`--only`: just these crossings, MAPS:SLICES; `--relative-features`: the fitted mergers read the RELATIVE border
features too (as `comp tune --relative-features`; the stored names get "-rel"); `--posterize Q`: also the one-window
slices with their grey levels rounded to every Q-th ("posterized xQ": the coarser grey step of a per-slice rendering,
with no other change of window or calibration), and with `--smooth SIGMA` those posterized slices smoothed back
(Gaussian, SIGMA px, rounded to whole grey levels), or with `--dither` posterized after uniform noise of one step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from comp.data.dataset import Dataset
from comp.methods.merge import MergeKind
from comp.pipeline.ensemble import EnsembleSpec, MemberRef
from comp.pipeline.oof import OOF
from comp.pipeline import tune as tuning
from comp.pipeline.tune import tune
from comp.pipeline.workspace import RunDir
from comp.nets.targets import PostParams


def posterized(images: np.ndarray, q: int, smooth: float | None, dither: bool = False) -> np.ndarray:
    """Slices with every grey level rounded down to a multiple of q (plus q // 2); optionally with uniform noise of one
    such step added first (dither: what a noisy scan does to the rounding), or smoothed back after."""
    x = images.astype(np.int32)
    if dither:
        x = x + np.random.default_rng(0).uniform(-q / 2, q / 2, x.shape)
    x = (x // q).astype(np.int32) * q + q // 2
    if smooth:
        from scipy.ndimage import gaussian_filter

        x = np.rint(np.stack([gaussian_filter(im.astype(np.float32), smooth) for im in x]))
    return np.clip(x, 0, 255).astype(np.uint8)


def main() -> None:
    """Tune each (maps, slices) crossing and print its nested and in-sample ARI."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("one_window", type=Path)
    ap.add_argument("per_slice", type=Path)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/per_slice_cross"))
    ap.add_argument("--depths", type=float, nargs="+")
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--relative-features", action="store_true")
    ap.add_argument("--posterize", type=int, help="also the one-window slices posterized to every Q-th grey level")
    ap.add_argument("--smooth", type=float, help="... and those smoothed by a Gaussian of this many px")
    ap.add_argument("--dither", action="store_true", help="... posterized after uniform noise of one step (seeded)")
    a = ap.parse_args()
    if a.depths:
        tuning.SUPERPIXEL_H = tuple(a.depths)
    runs = {"one window": a.one_window, "per slice": a.per_slice}
    data = {k: Dataset(RunDir(r).summary()["dataset"]["root"]) for k, r in runs.items()}
    oofs = {k: OOF.load([r], data[k]) for k, r in runs.items()}
    if not np.array_equal(oofs["one window"].members[0].ids, oofs["per slice"].members[0].ids):
        raise SystemExit("the two runs' OOF images differ: not the same slices and folds")
    slices_of = {k: (o.images, o.window) for k, o in oofs.items()}  # the superpixels' window is the slices' rendering's
    if a.posterize:
        name = f"posterized x{a.posterize}" + (", dithered" if a.dither else "") + (f", smoothed {a.smooth}" if a.smooth else "")
        slices_of[name] = (posterized(oofs["one window"].images, a.posterize, a.smooth, a.dither), oofs["one window"].window)
    print("| maps from | slices from | nested ARI | in-sample ARI | kept |\n|---|---|---|---|---|")
    for maps in runs:
        for slices, (images, window) in slices_of.items():
            if a.only and f"{maps}:{slices}" not in a.only:
                continue
            o = oofs[maps]
            oof = OOF(o.members, images, o.truths)
            oof.window = window
            short = slices[:3] if slices in runs else f"q{a.posterize}s{a.smooth or 0}{'d' if a.dither else ''}"
            spec = EnsembleSpec(name=f"cross-{maps[:3]}-{short}-{len(tuning.SUPERPIXEL_H)}{'-rel' if a.relative_features else ''}".replace(" ", ""), members=[MemberRef(str(runs[maps]), 1.0)],
                                post=PostParams(), data=data[maps].fingerprint())  # fmt: skip
            r = tune(spec, oof, a.runs, trials=a.trials, workers=2, kind=MergeKind(relative=a.relative_features))
            print(f"| {maps} | {slices} | {r.nested_ari:.4f} | {r.oof_ari:.4f} | {r.regions or 'maps'} at {r.merge_threshold} |", flush=True)


if __name__ == "__main__":
    main()
