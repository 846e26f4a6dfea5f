"""Why a network splits structures on data it was not fitted on: its maps on another data set's annotated slices,
against a network fitted on that data set's own folds.

For each run (its fold models averaged, the scored slices read through the contrast step resolved on their own data
set, as `comp transfer` reads them), on the same annotated slices:
- the maps inside the true structures: mean foreground, share of interior pixels (>= 3 px from any other label) whose
  boundary probability exceeds 0.5 (a split starts there), mean boundary at the true borders;
- seeds per structure (connected seed components under the run's post-processing, counted inside each structure), the
  share of structures with none, and with a distance or seed-evidence peak at or below its threshold;
- ARI, regions, split and merged structures at the run's post-processing, then with each post-processing threshold
  moved alone over a small grid. The grid is scored on the scored slices' labels: a diagnosis (which knob, if any,
  would undo the splits), never a selection.

Usage: .venv/bin/python scripts/network_diagnosis.py --score data/phantom --images 60 RUN [RUN...]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from comp.core.metric import image_scores, mean_counts, region_counts
from comp.core.parallel import pmap
from comp.data.contrast import resolve
from comp.data.sets import resolve_data
from comp.nets.targets import PostParams, instances_from_maps, seed_markers, upsample_maps
from comp.pipeline.oof import run_experiment
from comp.pipeline.submit import MemberMaps

GRID = {"seed_threshold": [0.3, 0.7], "seed_dist": [0.15, 0.5], "boundary_weight": [0.5, 2.0], "min_seed": [32, 128],
        "smooth": [2.0, 4.0], "merge_embedding": [0.5, 1.0]}  # fmt: skip
MAXIMA_H = [0.05, 0.1, 0.2]  # seed_mode maxima at these depths


def _map_stats(maps: np.ndarray, truth: np.ndarray, post: PostParams) -> dict[str, float]:
    """One slice: foreground and boundary inside the structures, boundary on their borders, seeds per structure."""
    m = upsample_maps(maps[:3], truth.shape[0])
    fg, bnd, dist = m
    structures = [truth == t for t in np.unique(truth[truth > 0])]
    inner = np.zeros_like(truth, bool)
    border = np.zeros_like(truth, bool)
    for s in structures:
        inner |= ndi.binary_erosion(s, iterations=3)
        border |= s & ~ndi.binary_erosion(s)
    lab = seed_markers(fg, bnd, dist, fg > post.fg_threshold, post, 1)  # every seed component, however small
    per = [len(np.unique(lab[s & (lab > 0)])) for s in structures]
    evidence = fg * (1 - post.boundary_weight * bnd)
    return {"fg_inside": float(fg[inner].mean()), "bnd_inside_hot": float((bnd[inner] > 0.5).mean()),
            "bnd_border": float(bnd[border].mean()), "seeds_per_structure": float(np.mean(per)),
            "unseeded": float(np.mean([n == 0 for n in per])),
            "dist_peak_low": float(np.mean([dist[s].max() <= post.seed_dist for s in structures])),
            "evidence_peak_low": float(np.mean([evidence[s].max() <= post.seed_threshold for s in structures])),
            "dist_peak": float(np.mean([dist[s].max() for s in structures]))}  # fmt: skip


def _post(maps: np.ndarray, p: PostParams) -> np.ndarray:
    """Instances of one slice's maps (a pool job)."""
    return instances_from_maps(maps, p)


def _scored(maps: np.ndarray, truth: np.ndarray, p: PostParams) -> dict[str, float]:
    """ARI and region counts of every slice's maps post-processed with p."""
    pred = np.stack(pmap(_post, list(maps), p))
    counts = mean_counts([region_counts(t, q) for t, q in zip(truth, pred)])
    return {"ari": float(image_scores(truth, pred).mean()), **counts}


def diagnose(run: Path, data, idx: np.ndarray) -> None:
    """Print one run's map statistics and its post-processing grid on the slices idx of data."""
    exp = run_experiment(run)[0]
    contrast = resolve(exp.contrast, data.x_train, str(data.root), lambda *_: None)
    x, truth = data.x_train[idx], data.y_train[idx]
    maps = MemberMaps(run, None, False, False, x=x, contrast=contrast).chunk(slice(None)).astype(np.float32)
    post = exp.params.post
    stats = [_map_stats(m, t, post) for m, t in zip(maps, truth)]
    print(f"\n## {run} on {data.name} ({len(idx)} annotated slices)")
    print("| " + " | ".join(f"{k} {np.mean([s[k] for s in stats]):.3f}" for k in stats[0]) + " |")
    print("| post-processing | ARI | regions | structures | split | merged |\n|---|---|---|---|---|---|")
    rows = [("as fitted", post)] + [(f"{k} {v}", replace(post, **{k: v})) for k, vs in GRID.items() for v in vs]
    rows += [(f"seed_mode maxima, seed_h {h}", replace(post, seed_mode="maxima", seed_h=h)) for h in MAXIMA_H]
    for name, p in rows:
        r = _scored(maps, truth, p)
        print(f"| {name} | {r['ari']:.4f} | {r['predicted']:.1f} | {r['true']:.1f} | {r['split']:.1f} | {r['merged']:.1f} |")


def main() -> None:
    """Diagnose every run given on the same annotated slices of --score."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--score", default="", help="the data set scored ('' = the embedded phantom)")
    ap.add_argument("--images", type=int, default=60, help="annotated slices used (evenly spaced; 0 = all)")
    a = ap.parse_args()
    data = resolve_data(a.score or None)
    ann = data.annotated
    idx = ann if a.images <= 0 or a.images >= len(ann) else ann[np.linspace(0, len(ann) - 1, a.images).astype(int)]
    for run in a.runs:
        diagnose(run, data, idx)


if __name__ == "__main__":
    main()
