"""Stopping rules by region count for a fitted hybrid merger, scored on data it was not fitted on (issue 24 item 3).

The hybrid fitted on every annotated slice of FIT merges the superpixels of SCORE's first N annotated slices with
its own threshold rule, then with rules that stop at (or never below, or never above) f times the number of regions
the fixed smoothed watershed finds on that slice (merge.vote_regions), the pairs taken in the classifier's order.
Exploratory: every rule is scored on the same slices, nothing is chosen. Usage:
  .venv/bin/python scripts/merge_stop_rules.py hybrid_render data/proxy data/phantom 100
"""
import sys
from pathlib import Path
import numpy as np
from comp.core.metric import image_scores
from comp.core.parallel import pmap
from comp.data.dataset import Dataset
from comp.pipeline.config import load_experiment
from comp.pipeline.submit import fit_every_annotated
from comp.pipeline.transfer import _resolved_on
from comp.methods.merge import FEATURES, FeatureGraph, FirstEdges, matching, vote_regions
from comp.regions.ops import relabel_uint8
from comp.regions.superpixels import superpixels

exp = load_experiment(sys.argv[1])
fit, score = Dataset(sys.argv[2]), Dataset(sys.argv[3])
method = fit_every_annotated(exp, fit, 0, Path("runs"))
method.contrast = _resolved_on(score, exp.contrast)
ann = score.annotated[: int(sys.argv[4]) if len(sys.argv) > 4 else None]
imgs, raws = method.contrast.stretch(score.x_train[ann]), method.contrast.canonical(score.x_train[ann])
truth = score.y_train[ann]
mg, sp = method.merger, method.p.superpixels
print("fitted", method.fitted, flush=True)

def run(item, rule, f):
    image, raw = item
    graph = FeatureGraph(superpixels(image, sp), None, image, None, raw)
    target = int(vote_regions(image).max()) * f if rule != "threshold" else 0
    first = None
    for r in range(48 if rule != "threshold" else mg.max_rounds):
        pairs, x = graph.features(mg.relative)
        if len(pairs) == 0:
            break
        if first is not None:
            p = first.pooled(graph.current_ids(), pairs)
        else:
            p = mg.probabilities(x, -1)
            if mg.linkage == "average":
                first = FirstEdges(pairs, p, np.expm1(x[:, FEATURES.index("log_border")]))
        n = len(np.unique(graph.current_ids()[1:]))  # regions (id 0 is none)
        if rule == "threshold":
            above = np.flatnonzero(p >= mg.threshold)
        elif rule == "count":  # ignore the threshold: merge by p order down to the target count
            if n <= target: break
            above = np.flatnonzero(p >= 0.02)
        elif rule == "floor":  # threshold, and go on merging down to the target (never stop above it)
            above = np.flatnonzero(p >= (mg.threshold if n <= target else 0.02))
        elif rule == "ceiling":  # threshold, but never below the target
            if n <= target: break
            above = np.flatnonzero(p >= mg.threshold)
        if len(above) == 0:
            break
        m = matching(pairs, above[np.argsort(-p[above], kind="stable")])
        if rule != "threshold" and n > target:  # no further than the target count
            m = m[: max(1, int(n - target))]
        graph.merge(m)
    return relabel_uint8(graph.label_map())

items = list(zip(imgs, raws))
for rule, f in [("threshold", 1), ("count", 1.0), ("count", 1.5), ("count", 0.75), ("floor", 1.0), ("ceiling", 1.0)]:
    pred = np.stack(pmap(run, items, rule, f, workers=2))
    s = image_scores(truth, pred)
    print(rule, f, f"{s.mean():.4f} std {s.std():.3f}", flush=True)
