"""Selection on OOF scores: nested estimates, the one-standard-error gain and greedy forward selection."""

from __future__ import annotations

from typing import Callable

import numpy as np

from comp.core.log import LOG
from comp.core.metric import group_means
from comp.nets.targets import PostParams
from comp.pipeline.oof import OOF


def nested_scores(folds: np.ndarray, idx: np.ndarray, search: Callable[[np.ndarray], object],
                  score: Callable[[object, np.ndarray], np.ndarray]) -> np.ndarray:  # fmt: skip
    """Per-image scores of `idx` where each fold's images are scored with what `search` found on the other folds'."""
    out = np.full(len(folds), np.nan)
    for k in np.unique(folds[idx]):
        held, inner = idx[folds[idx] == k], idx[folds[idx] != k]
        out[held] = score(search(inner), held)
    return out[idx]


def gain_and_se(new: np.ndarray, old: np.ndarray, keys: np.ndarray) -> tuple[float, float]:
    """Mean per-image gain of `new` over `old` scores, and the standard error of the per-group (fold or scan) mean
    gains: a more fitted candidate is kept only when its gain exceeds that spread (the one-standard-error rule)."""
    d = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    return float(d.mean()), group_means(d, keys)[2]


def greedy_select(oof: OOF, post: PostParams, max_steps: int = 8, idx=None, workers: int = 0, verbose: bool = True) -> tuple[list[int], list[dict]]:
    """Greedy forward selection with replacement by mean OOF ARI; returns member counts and the path taken.

    The first step takes the best single; every later addition must gain more than the standard error of its
    per-fold gains, else the simpler ensemble is kept (one-standard-error rule)."""
    counts = [0] * len(oof.members)
    keys = oof.folds if idx is None else oof.folds[idx]
    best, current, path = -np.inf, None, []
    for step in range(max_steps):
        trial = []
        for j in range(len(oof.members)):
            c = counts.copy()
            c[j] += 1
            per_image = oof.scores(c, post, idx=idx, workers=workers)
            trial.append((float(per_image.mean()), j, per_image))
        score, j, per_image = max(trial, key=lambda t: (t[0], t[1]))
        if score <= best + 1e-6:
            break
        if current is not None:
            gain, se = gain_and_se(per_image, current, keys)
            if gain <= se:
                if verbose:
                    LOG.info(f"step {step + 1}: + {oof.members[j].label} would gain {gain:.4f}, within its per-fold standard error "
                          f"{se:.4f}: the simpler ensemble is kept")  # fmt: skip
                break
        counts[j] += 1
        best, current = score, per_image
        path.append({"step": step + 1, "added": oof.members[j].label, "oof_ari": round(score, 6)})
        if verbose:
            LOG.info(f"step {step + 1}: + {oof.members[j].label} -> OOF ARI {score:.4f}")
    return counts, path
