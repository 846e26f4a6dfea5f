"""The hybrid method: a fine intensity over-segmentation of the contrast-stretched slice, merged by LightGBM.

Superpixels (h-minima watershed of the smoothed gradient, ~1,000 per slice) can follow almost every true
border; a pair classifier trained on the fold's training slices (intensity, gradient along the border,
texture and shape features) then merges neighbours that belong to one structure, round after round.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from comp.core.fields import added, bounded
from comp.core.log import LOG
from comp.core.metric import image_scores
from comp.core.parallel import pmap
from comp.core.store import FoldDir
from comp.data.contrast import Contrast
from comp.methods.base import FitContext, FoldData, inner_split
from comp.methods.merge import (FEATURES, LINKAGES, Calibration, Merger, agglomeration_rows, fit_calibration,
                                held_out_probabilities, model_text, save_merger, train_classifier, unknown_features,
                                without)
from comp.methods.registry import register_method
from comp.nets.targets import resolve
from comp.regions.superpixels import SuperpixelParams, merged_superpixels, superpixels


@dataclass
class HybridParams:
    """Superpixels, the merge classifier's training and its use."""

    superpixels: SuperpixelParams = field(default_factory=SuperpixelParams)
    threshold: float = bounded(0.5, lo=0, hi=1)  # merge a pair when the classifier's probability reaches this
    # Chosen on each training fold: superpixel depth h x threshold, scored on `fit_images` training slices
    # (whole CT volumes when the data set has groups) that the classifier of that choice did not train on.
    fit_h: list[float] = bounded(factory=lambda: [0.005, 0.0075, 0.01], lo=0, lo_open=True, min_len=1)
    fit_thresholds: list[float] = bounded(factory=lambda: [0.2, 0.35, 0.5, 0.65], lo=0, hi=1, min_len=1)
    fit_images: int = bounded(16, lo=0)  # 0 = no selection: superpixels.h and threshold as given
    # Held-out sets (each of about `fit_images` slices, drawn with other seeds) whose pooled scores pick (h, threshold):
    # one set of 16 slices, a few volume blocks of one scan, picks noisy optima whose neighbours score far lower.
    fit_repeats: int = bounded(1, lo=1, added=True)
    # Classifiers whose merge probabilities are averaged (a bag), each trained on the pairs of its own draw (which true
    # pairs merge first at each agglomeration stage, which pairs are sampled): one draw's classifier moves transfer by 0.02.
    fit_bags: int = bounded(1, lo=1, added=True)
    max_rounds: int = bounded(16, lo=0)  # merge rounds at prediction (each merges a matching of pairs, then re-scores)
    train_rounds: int = bounded(8, lo=1)  # agglomeration stages whose pairs train the classifier
    train_pairs: int = bounded(1500, lo=1)  # pairs drawn per slice and stage (bounds the training set)
    # Pair features the classifier may not use (comp.methods.merge.FEATURES), e.g. the position ones, which can learn
    # where structures sit in the training scan's body rather than what their border looks like.
    drop_features: list[str] = field(default_factory=list)
    linkage: str = "classifier"  # classifier | average (comp.methods.merge.Merger.linkage)
    relative_features: bool = added(False)  # also the borders' gradient and intensity step relative to the slice's (merge.RELATIVE)
    vote_features: bool = added(False)  # also the fixed smoothed watershed's vote on each pair (merge.VOTE)
    # Extra renderings of every training slice (RENDERINGS: sharpened or blurred, noised, gamma-shifted, seeded) whose
    # pairs also train the classifier, so a merger fitted on one scan's blur and noise has met others' too.
    renderings: int = bounded(0, lo=0, added=True)
    # Calibrate the classifier's probabilities (isotonic, on the held-out training slices' pairs of the inner
    # classifier, which also picks h and threshold; the final classifier reuses that map): average linkage then pools
    # frequencies, and the threshold means the same for the inner classifier it was chosen with and the final one.
    calibrate: bool = added(False)
    workers: int = bounded(0, lo=0)

    def violations(self) -> dict[str, str]:
        """Feature names that do not exist, an unknown linkage."""
        bad = unknown_features(self.drop_features)
        out = {"drop_features": f"unknown feature '{bad[0]}' (known: {', '.join(FEATURES)})"} if bad else {}
        if self.linkage not in LINKAGES:
            out["linkage"] = f"must be one of {', '.join(LINKAGES)}, got {self.linkage!r}"
        return out

    def merger(self, models: dict, threshold: float | None = None, calibration: Calibration = Calibration()) -> Merger:
        """A merger of these settings around trained classifiers."""
        t = self.threshold if threshold is None else threshold
        return Merger(models, t, self.max_rounds, tuple(self.drop_features), self.linkage, self.relative_features,
                      self.vote_features, calibration)  # fmt: skip


# How far a training slice's extra rendering moves (uniform draws): unsharp-mask amount (nets.targets.resolve, sigma
# SHARPEN_SIGMA; below 0: a blur of that many px instead), noise sd in grey levels, gamma. Wide enough to span a 3 mm
# scan stretched 4x and a sharp one.
RENDERINGS = {"sharpen": (-2.0, 1.5), "noise": (0.0, 6.0), "gamma": (0.8, 1.25)}
BAG_SEED = 1_000_003  # how far apart the bag's draws seed a slice's rows


def rerender(image: np.ndarray, seed: int) -> np.ndarray:
    """One random rendering of a stretched uint8 slice (RENDERINGS): sharpened or blurred, noised, gamma-shifted."""
    rng = np.random.default_rng(seed)
    amount, sd, gamma = (rng.uniform(*RENDERINGS[k]) for k in ("sharpen", "noise", "gamma"))
    x = resolve(image.astype(np.float32), amount)  # the networks' resolution augmentation, the same blur and sharpening
    x = 255 * (np.clip(x + rng.normal(0, sd, x.shape), 0, 255) / 255) ** gamma
    return np.rint(x).astype(np.uint8)


def _rows(item: tuple, p: HybridParams) -> tuple[np.ndarray, np.ndarray]:
    """Training rows of one slice (stretched, raw, truth, seed), and of its extra renderings (a pool job)."""
    image, raw, truth, seed = item
    out = [agglomeration_rows(superpixels(im, p.superpixels), None, im, truth, p.train_rounds, p.train_pairs, seed + r, raw,
                              p.relative_features, p.vote_features)
           for r, im in enumerate([image] + [rerender(image, seed * 7919 + r) for r in range(p.renderings)])]  # fmt: skip
    return np.concatenate([x for x, _ in out]), np.concatenate([y for _, y in out])


def _segment(item: tuple, p: HybridParams, merger: Merger) -> np.ndarray:
    """One slice (stretched, raw[, its superpixels when already made]): superpixels, merged."""
    image, raw, *given = item
    return merged_superpixels(image, raw, p.superpixels, merger, given=given[0] if given else None)


def _superpixels(image: np.ndarray, p: HybridParams) -> np.ndarray:
    """One stretched slice's superpixels (a pool job), as the smallest integer type that holds them."""
    sp = superpixels(image, p.superpixels)
    return sp.astype(np.uint16) if sp.max() < 2**16 else sp


Rows = list[tuple[np.ndarray, np.ndarray]]  # training rows (features, labels) of each slice


def _bag_rows(items: list[tuple], p: HybridParams, desc: str) -> list[Rows]:
    """Every slice's training rows, once per draw of the bag (draw 0: the slices' own seeds)."""
    draws = [(*it[:3], it[3] + BAG_SEED * b) for b in range(p.fit_bags) for it in items]
    flat = pmap(_rows, draws, p, workers=p.workers, desc=desc)
    return [flat[b * len(items) : (b + 1) * len(items)] for b in range(p.fit_bags)]


def _train_one(rows: Rows, idx: np.ndarray, drop: list[str]) -> str:
    """The pair classifier on the rows of slices `idx` (without the `drop`ped features), as text (forked prediction
    workers build it themselves: no LightGBM/OpenMP state crosses a fork). A pool job: single-threaded."""
    x = without(np.concatenate([rows[i][0] for i in idx]), drop)
    y = np.concatenate([rows[i][1] for i in idx])
    LOG.info(f"hybrid: classifier on {len(y)} pairs of {len(idx)} slices, {int(y.sum())} to merge")
    return model_text(train_classifier(x, y))


def _train(bags: list[Rows], idx: np.ndarray, drop: list[str] = (), workers: int = 0) -> str | list[str]:
    """One classifier per draw of the bag, the draws spread over workers (a bag of one: its classifier alone)."""
    out = pmap(_train_one, bags, idx, list(drop), workers=workers if len(bags) > 1 else 1)
    return out[0] if len(out) == 1 else out


def _calibration(rows: Rows, idx: np.ndarray, merger: Merger, workers: int) -> Calibration:
    """The isotonic map of `merger`'s classifier fitted on the rows of slices `idx`, which it did not train on."""
    raw = pmap(held_out_probabilities, [rows[i][0] for i in idx], merger, workers=workers)
    return fit_calibration(np.concatenate(raw), np.concatenate([rows[i][1] for i in idx]))


def _held_out_scores(bags: list[Rows], images: np.ndarray, raws: np.ndarray, truth: np.ndarray,
                     split: tuple[np.ndarray, np.ndarray], p: HybridParams) -> tuple[dict[float, np.ndarray], Calibration]:  # fmt: skip
    """Per-image ARI of the held-out slices of `split` at every fit threshold, merged by a classifier (bag) trained on
    the others (and its calibration, fitted on the held-out slices' pairs of the first draw when asked)."""
    fit_idx, val_idx = split
    inner = p.merger({-1: _train(bags, fit_idx, p.drop_features, p.workers)})
    if p.calibrate:
        inner.calibration = _calibration(bags[0], val_idx, inner, p.workers)
    val_sp = pmap(_superpixels, [images[i] for i in val_idx], p, workers=p.workers)  # once for every threshold
    val = [(images[i], raws[i], s) for i, s in zip(val_idx, val_sp)]
    scores = {}
    for t in p.fit_thresholds:
        inner.threshold = t
        scores[t] = image_scores(truth[val_idx], np.stack(pmap(_segment, val, p, inner, workers=p.workers)))
    return scores, inner.calibration


@register_method("hybrid", HybridParams)
class Hybrid:
    """Fitted on the fold's training slices only: the classifier never sees the images it merges in CV."""

    def __init__(self, params: HybridParams) -> None:
        self.p = params
        self.contrast = Contrast()
        self.merger = params.merger({})

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Pick (h, threshold) with classifiers trained without some training slices, then train on them all."""
        self.contrast = ctx.contrast
        images, raws = self.contrast.stretch(train.x), self.contrast.canonical(train.x)
        items = [(im, raw, t, ctx.seed * 100003 + i) for i, (im, raw, t) in enumerate(zip(images, raws, train.y))]
        n_val = min(self.p.fit_images, len(items) // 3)
        splits = [inner_split(len(items), n_val, ctx.seed + 7919 * r, "params.fit_images", train.groups)
                  for r in range(self.p.fit_repeats)]  # fmt: skip
        splits = [s for s in splits if len(s[1])]
        grid = [replace(self.p.superpixels, h=h) for h in self.p.fit_h] if splits else [self.p.superpixels]
        best, bags = (-np.inf, self.p.superpixels, self.p.threshold, Calibration()), None
        for sp in grid:
            p = replace(self.p, superpixels=sp)
            bags_sp = _bag_rows(items, p, f"hybrid: pair features (h {sp.h})")
            if not splits:  # no selection: the one grid point's rows train the classifier
                bags = bags_sp
                continue
            scored = [_held_out_scores(bags_sp, images, raws, train.y, split, p) for split in splits]
            for t in self.p.fit_thresholds:
                per_image = np.concatenate([scores[t] for scores, _ in scored])
                score = float(per_image.mean())
                LOG.debug(f"hybrid: h {sp.h} threshold {t}: {score:.4f} on {len(per_image)} held-out training slices "
                          f"({len(scored)} sets)")  # fmt: skip
                if score > best[0]:  # the final classifier reuses the first set's calibration
                    best, bags = (score, sp, t, scored[0][1]), bags_sp
        _, sp, threshold, calibration = best
        self.p = replace(self.p, superpixels=sp, threshold=threshold)
        models = {-1: _train(bags, np.arange(len(items)), self.p.drop_features, self.p.workers)}
        self.merger = self.p.merger(models, threshold, calibration)
        save_merger(self.merger, FoldDir(Path(ctx.workdir)).merger)
        self.fitted = {"h": sp.h, "threshold": threshold}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Superpixels of every stretched slice, merged by the fitted classifier."""
        items = list(zip(self.contrast.stretch(x), self.contrast.canonical(x)))
        return np.stack(pmap(_segment, items, self.p, self.merger, workers=self.p.workers, desc="hybrid"))
