"""Where the tuned ensemble's per-slice loss comes from (issue 23): its maps or the slices it merges.

The one-window and per-slice proxies hold the same slices in the same order and folds, rendered two ways. This
tunes the results suite's ensemble (one network's maps, superpixels merged by LightGBM, 12 trials, no other run's
regions) on each crossing: maps of the run on one rendering, superpixels and merge features of the slices of the
other (and the superpixels' contrast window the slices' run resolved). If the loss follows the slices, the merging is what the per-slice rendering costs; if the maps, the network.

Usage: .venv/bin/python scripts/per_slice_cross.py ONE_WINDOW_RUN PER_SLICE_RUN [--trials 12] [--runs DIR]
       [--depths H ...] [--only "one window:per slice" ...] [--relative-features]
(the two CV runs of one experiment, e.g. unet_cpu_pseudo on data/proxy and data/proxy_ps). Prints a table.
`--depths`: the superpixel depths the tuning may pick among (default: the tuning's own, comp.pipeline.tune.SUPERPIXEL_H);
`--only`: just these crossings, MAPS:SLICES; `--relative-features`: the fitted mergers read the RELATIVE border
features too (as `comp tune --relative-features`; the stored names get "-rel").
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
    a = ap.parse_args()
    if a.depths:
        tuning.SUPERPIXEL_H = tuple(a.depths)
    runs = {"one window": a.one_window, "per slice": a.per_slice}
    data = {k: Dataset(RunDir(r).summary()["dataset"]["root"]) for k, r in runs.items()}
    oofs = {k: OOF.load([r], data[k]) for k, r in runs.items()}
    if not np.array_equal(oofs["one window"].members[0].ids, oofs["per slice"].members[0].ids):
        raise SystemExit("the two runs' OOF images differ: not the same slices and folds")
    print("| maps from | slices from | nested ARI | in-sample ARI | kept |\n|---|---|---|---|---|")
    for maps in runs:
        for slices in runs:
            if a.only and f"{maps}:{slices}" not in a.only:
                continue
            o = oofs[maps]
            oof = OOF(o.members, oofs[slices].images, o.truths)
            oof.window = oofs[slices].window  # the superpixels' window is the slices' rendering's, as their CV resolved it
            spec = EnsembleSpec(name=f"cross-{maps[:3]}-{slices[:3]}-{len(tuning.SUPERPIXEL_H)}{'-rel' if a.relative_features else ''}".replace(" ", ""), members=[MemberRef(str(runs[maps]), 1.0)],
                                post=PostParams(), data=data[maps].fingerprint())  # fmt: skip
            r = tune(spec, oof, a.runs, trials=a.trials, workers=2, kind=MergeKind(relative=a.relative_features))
            print(f"| {maps} | {slices} | {r.nested_ari:.4f} | {r.oof_ari:.4f} | {r.regions or 'maps'} at {r.merge_threshold} |", flush=True)


if __name__ == "__main__":
    main()
