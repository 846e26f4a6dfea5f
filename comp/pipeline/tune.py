"""Tuning an ensemble: Optuna search of post-processing (and weights) on cached OOF maps, then learned region
merging and the choice of region starts; a method's own parameters are tuned in tune_method.

Studies live in an RDB storage (SQLite under runs/tune/ by default, PostgreSQL for several workers) and
resume after a kill: the target is a number of *complete* trials, counted across every worker. The best
result goes into the ensemble file only when it beats the score already stored there.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from comp.core.errors import UserError
from comp.core.log import LOG
from comp.methods.merge import Merger, MergeKind, fit_merging, fit_region_merging, save_merger
from comp.nets.targets import PostParams
from comp.pipeline.ensemble import EnsembleSpec, merger_path, save_ensemble
from comp.pipeline.oof import OOF
from comp.pipeline.select import gain_and_se, nested_scores
from comp.pipeline.study import hold_trial, inner_study, open_study, run_study, storage_url, suggest_space
from comp.pipeline.workspace import RunDir
from comp.regions.superpixels import Regions, SuperpixelParams


# name: (low, high, log). Integer fields of PostParams get integer suggestions.
SPACE: dict[str, tuple[float, float, bool]] = {
    "fg_threshold": (0.2, 0.8, False),
    "seed_threshold": (0.1, 0.9, False),
    "seed_dist": (0.02, 0.8, False),
    "boundary_weight": (0.0, 2.0, False),
    "min_seed": (1, 64, True),
    "min_size": (1, 300, True),
    "smooth": (0.0, 3.0, False),
    "merge_embedding": (0.0, 2.0, False),
}
MERGE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCAN_IMAGES = 80
# The hybrid candidate (superpixels merged with the maps as features): ~1,000 regions an image make each
# scoring ~10x slower than the maps' watershed, hence fewer thresholds on fewer images.
SUPERPIXEL_H = (0.0075,)  # superpixel depth (both stand-ins' tuning picked it over 0.005 when both were tried)
SUPERPIXEL_THRESHOLDS = (0.2, 0.35, 0.5, 0.65)
SUPERPIXEL_SCAN_IMAGES = 40
# Another method's own OOF predictions (e.g. the hybrid's) as the regions, merged further with the maps as
# features, or kept as they are (None): tens of regions an image, as cheap to score as the maps' watershed.
RUN_THRESHOLDS = (None, 0.35, 0.5, 0.65, 0.8)


@dataclass
class TuneResult:
    """What one `comp tune` call found and whether it was stored."""

    best_trial_ari: float
    oof_ari: float  # in-sample: scored on the images the search optimised
    oof_ari_no_merge: float
    merge_threshold: float | None
    stored: bool
    trials_complete: int
    trials_per_minute: float
    nested_ari: float  # honest: each fold scored with a search on the other folds
    baseline_ari: float  # the stored settings' score on these OOF images (a non-learned run: its own CV score)
    regions: str = ""  # what merging starts from when not the maps' watershed (superpixels, or a run's regions)
    bar: float | None = None  # what the nested estimate had to beat to be stored (None: nothing was stored yet)


def study_name(spec: EnsembleSpec, images: int, space: dict | None = None) -> str:
    """A study per (ensemble members, image subset, search space): each makes a different objective."""
    key = "|".join(m.run for m in spec.members) + f"|{images}|{spec.post.mode}" + ("" if space in (None, SPACE) else f"|{sorted(space)}")
    return f"{spec.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _active(space: dict, post: PostParams, has_embedding: bool) -> dict:
    """The part of a post-processing space that applies: no embedding merge without embeddings, 3 knobs for `cc`."""
    return {k: v for k, v in space.items() if (k != "merge_embedding" or has_embedding)
            and (post.mode != "cc" or k in ("fg_threshold", "min_size", "smooth"))}  # fmt: skip


def suggest(trial, base: PostParams, n_members: int, has_embedding: bool, space: dict | None = None) -> tuple[PostParams, list[float]]:
    """Post-processing parameters and ensemble weights for one trial."""
    values = suggest_space(trial, _active(space or SPACE, base, has_embedding), PostParams)
    weights = [trial.suggest_float(f"w{j}", 0.0, 1.0) for j in range(n_members)] if n_members > 1 else [1.0]
    if not any(w > 0 for w in weights):
        weights = [1.0] * n_members
    return dataclasses.replace(base, **values), weights


def start_params(spec: EnsembleSpec, has_embedding: bool, space: dict | None = None) -> dict:
    """The stored settings as a trial, so the search starts from (and can only improve on) them."""
    active = _active(space or SPACE, spec.post, has_embedding)
    p = {k: min(max(getattr(spec.post, k), lo), hi) for k, (lo, hi, _) in active.items()}
    if len(spec.members) > 1:
        top = max(m.weight for m in spec.members)
        p.update({f"w{j}": m.weight / top for j, m in enumerate(spec.members)})
    return p


@dataclass
class _Kept:
    """What the stages of `tune` keep so far: per-image in-sample and nested scores, the merge threshold (None: no
    merging), its merger and the regions it starts from (None: the maps' watershed)."""

    full: np.ndarray
    nested: np.ndarray
    threshold: float | None = None
    merger: object = None
    regions: Regions | None = None


def tune(
    spec: EnsembleSpec,
    oof: OOF,
    runs: Path,
    trials: int = 40,
    storage: str | None = None,
    images: int = 0,
    workers: int = 0,
    merge: bool = True,
    seed: int = 0,
    params: list[str] | None = None,
    superpixels: bool = True,
    region_runs: list[Path] | None = None,
    command: str = "",
    kind: MergeKind = MergeKind(),
) -> TuneResult:
    """Search post-processing and weights on OOF maps, estimate it nested across folds, add merging, store if honestly better.

    With `superpixels`, the hybrid is a second candidate: superpixels of the stretched slice merged by pair
    classifiers that read the tuned blend's maps; `region_runs` (CV runs of instance-predicting methods on the
    same folds) add their OOF predictions as regions, kept or merged further the same way. Whichever has the
    better nested estimate is kept. Every merger fitted is of `kind` (linkage, relative features).

    The study's best trial is scored on the images it was searched on (in-sample). The honest number is the
    nested estimate: each fold's images scored with the best of a search on the other folds' images. The
    tuned settings are kept only when their nested estimate beats the stored settings on every OOF image.
    """
    for r in region_runs or []:  # before any search: a run on other folds would be refused after minutes of work
        oof.check_run(r)
    bar = spec.nested_ari  # what a result must beat to be stored (None: nothing stored yet)
    search = _search(spec, oof, runs, trials, storage, images, workers, seed, params)
    post, weights, kept, defaults = _post_processing(spec, oof, search, trials, seed, workers)
    no_merge = float(kept.full.mean())
    if merge:
        kept = _merging(oof, weights, post, kept, seed, workers, kind)
        kept = _region_starts(oof, weights, kept, superpixels, region_runs, seed, workers, kind)
    new_ari, new_nested = float(kept.full.mean()), float(kept.nested.mean())
    stored = bar is None or new_nested > bar + 1e-9
    if stored:
        _store(spec, runs, command, post, weights, kept, no_merge, kind)
    return TuneResult(float(search.best.value), new_ari, no_merge, kept.threshold, stored, search.done, search.rate, new_nested,
                      float(defaults.mean()), _describe(kept.regions) if kept.regions is not None else "", bar)  # fmt: skip


@dataclass
class _Search:
    """The Optuna search's outcome: its best trial, the trial it started from, the objective, counts and speed."""

    best: object
    start: dict
    objective_on: Callable
    done: int
    rate: float


def _search(spec: EnsembleSpec, oof: OOF, runs: Path, trials: int, storage: str | None, images: int, workers: int,
            seed: int, params: list[str] | None) -> _Search:  # fmt: skip
    """Resume or run the study (post-processing and member weights) to `trials` complete trials on the OOF images."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    has_emb = all(m.channels > 3 for m in oof.members)
    space = restrict(SPACE, params)
    idx = oof.subset(images, seed)
    study = open_study(storage_url(storage, spec.name, runs), study_name(spec, images, space), seed)
    start = start_params(spec, has_emb, space)
    study.enqueue_trial(start, skip_if_exists=True)

    def objective_on(sub: np.ndarray) -> Callable:
        def objective(trial) -> float:
            hold_trial(trial)
            post, weights = suggest(trial, spec.post, len(oof.members), has_emb, space)
            return float(oof.scores(weights, post, idx=sub, workers=workers).mean())

        return objective

    done, rate = run_study(study, objective_on(idx), trials, f"{len(idx)} OOF images")
    return _Search(study.best_trial, start, objective_on, done, rate)


def _post_processing(spec: EnsembleSpec, oof: OOF, search: _Search, trials: int, seed: int,
                     workers: int) -> tuple[PostParams, list[float], _Kept, np.ndarray]:  # fmt: skip
    """The best trial scored on every OOF image and nested across folds; the stored settings kept unless it beats
    them nested. Returns the post-processing, the weights, their scores and the stored settings' scores."""
    every = np.arange(len(oof.images))
    defaults = oof.scores([m.weight for m in spec.members], spec.post, workers=workers, desc="score the stored settings")
    post, weights = _from_params(search.best.params, spec.post, len(oof.members))
    full = oof.scores(weights, post, workers=workers, desc="score best on all OOF images")

    def replay(p: dict, held: np.ndarray) -> np.ndarray:
        post_k, weights_k = _from_params(p, spec.post, len(oof.members))
        return oof.scores(weights_k, post_k, idx=held, workers=workers)

    if search.best.params == search.start:  # nothing beat the stored settings even in-sample: no search to check on held-out folds
        LOG.info("no trial beat the stored settings: they are kept (no nested search needed)")
        nested = defaults
    else:
        LOG.info(f"nested estimate: {len(np.unique(oof.folds))} searches of {trials} trials, each on the other folds' images")
        inner = lambda sub: inner_study(search.objective_on(sub), [search.start], trials, seed)  # noqa: E731
        nested = nested_scores(oof.folds, every, inner, replay)
    LOG.info(f"stored settings {defaults.mean():.4f}; tuned: in-sample {full.mean():.4f}, nested {nested.mean():.4f}")
    if nested.mean() <= defaults.mean() + 1e-9:  # the search does not generalise: keep what is stored
        LOG.info("the nested estimate does not beat the stored settings: they are kept")
        return spec.post, [m.weight for m in spec.members], _Kept(defaults, defaults), defaults
    return post, weights, _Kept(full, nested), defaults


def _merging(oof: OOF, weights: list[float], post: PostParams, kept: _Kept, seed: int, workers: int, kind: MergeKind) -> _Kept:
    """LightGBM merging of the post-processed regions: its threshold scanned on a subset, its gain nested across
    folds; kept only when that gain beats its per-fold standard error."""
    every, full, nested = np.arange(len(oof.images)), kept.full, kept.nested
    merger = fit_merging(oof, weights, post, workers, kind)
    scan = oof.subset(SCAN_IMAGES, seed)  # thresholds compared on a subset, the winner scored on every image
    per_t = {}
    for t in MERGE_THRESHOLDS:
        merger.threshold = t
        per_t[t] = oof.scores(weights, post, merger, idx=scan, workers=workers) - full[scan]
        LOG.debug(f"merge threshold {t}: {per_t[t].mean():+.4f} OOF ARI on {len(scan)} images")
    t_best = max(per_t, key=lambda t: per_t[t].mean())
    if per_t[t_best].mean() <= 0:
        return _Kept(full, nested, None, merger)
    pick = lambda inner: max(per_t, key=lambda t: per_t[t][np.isin(scan, inner)].mean())  # noqa: E731

    def merged_at(t: float, held: np.ndarray) -> np.ndarray:
        merger.threshold = t
        return oof.scores(weights, post, merger, idx=held, workers=workers)

    merged = merged_at(t_best, every)
    # Merging's gain per image with each fold's threshold chosen on the other folds, added to the nested
    # estimate of the post-processing (the gain is measured on top of the post-processing found in-sample).
    gain = nested_scores(oof.folds, every, pick, merged_at) - full
    LOG.info(f"merging at {t_best}: in-sample {merged.mean():.4f}, nested {(nested + gain).mean():.4f} "
          f"(without merging {full.mean():.4f}, nested {nested.mean():.4f})")  # fmt: skip
    g, se = gain_and_se(nested + gain, nested, oof.folds)
    if g > max(se, 1e-6):
        return _Kept(merged, nested + gain, t_best, merger)
    LOG.info(f"merging gains {g:+.4f} nested, within its per-fold standard error {se:.4f}: left out")
    return _Kept(full, nested, None, merger)


def _region_starts(oof: OOF, weights: list[float], kept: _Kept, superpixels: bool, region_runs: list[Path] | None,
                   seed: int, workers: int, kind: MergeKind) -> _Kept:  # fmt: skip
    """Merging from other regions than the maps' watershed: superpixels of the stretched slice, other runs' OOF
    predictions; each taken when it beats what is kept by more than its per-fold standard error."""
    candidates = []
    if superpixels:
        candidates.append(([Regions(SuperpixelParams(h=h), oof.window()) for h in SUPERPIXEL_H], SUPERPIXEL_THRESHOLDS, SUPERPIXEL_SCAN_IMAGES))
    if region_runs:
        candidates.append(([Regions(window=oof.window(), run=str(r)) for r in region_runs], RUN_THRESHOLDS, SCAN_IMAGES))
    for choices, thresholds, scan_n in candidates:
        c_full, c_nested, cand, c_t, c_merger = region_candidate(oof, weights, choices, thresholds, scan_n, seed, workers, kind)
        LOG.info(f"{_describe(cand)} + merging at {c_t}: in-sample {c_full.mean():.4f}, nested {c_nested.mean():.4f} "
              f"(so far: nested {kept.nested.mean():.4f})")  # fmt: skip
        g, se = gain_and_se(c_nested, kept.nested, oof.folds)  # the fitted start must beat the simpler by more than its spread
        if g > se:
            kept = _Kept(c_full, c_nested, c_t, c_merger, cand)
        LOG.info(f"{_describe(cand)}: gain {g:+.4f} nested against its per-fold standard error {se:.4f}: "
              f"{'taken' if g > se else 'the simpler one kept'}")  # fmt: skip
    return kept


def _store(spec: EnsembleSpec, runs: Path, command: str, post: PostParams, weights: list[float], kept: _Kept,
           no_merge: float, kind: MergeKind) -> None:  # fmt: skip
    """Write the tuned settings (normalised weights, post-processing, merging, regions, scores) into the ensemble file."""
    record_command(spec, command)
    total = sum(weights)
    for m, w in zip(spec.members, weights):
        m.weight = round(w / total, 6)
    spec.post = post
    spec.merge.enabled = kept.threshold is not None
    spec.merge.threshold = kept.threshold if kept.threshold is not None else spec.merge.threshold
    spec.merge.linkage, spec.merge.relative, spec.merge.calibrate = kind.linkage, kind.relative, kind.calibrate
    spec.merge.drop = list(kind.drop)
    spec.regions = kept.regions
    spec.oof_ari, spec.oof_std, spec.oof_ari_no_merge = float(kept.full.mean()), float(kept.full.std()), no_merge
    spec.nested_ari = float(kept.nested.mean())
    if kept.threshold is not None:
        kept.merger.threshold = kept.threshold
        save_merger(kept.merger, merger_path(spec.name, runs))
    save_ensemble(spec, runs)


def record_command(spec: EnsembleSpec, command: str) -> None:
    """The tune call that produced the stored settings, beside the command that made the file (the leaderboard shows both)."""
    spec.tune_command = "" if command == spec.command else command


def region_candidate(oof: OOF, weights: list[float], choices: list[Regions], thresholds: tuple, scan_n: int, seed: int = 0,
                     workers: int = 0, kind: MergeKind = MergeKind()) -> tuple[np.ndarray, np.ndarray, Regions, float | None, Merger]:  # fmt: skip
    """Merging that starts from other regions than the maps' watershed: per choice (a superpixel depth, or a run's
    predictions), fold mergers reading the blend's maps (image k merged by a model blind to fold k); choice and
    threshold (None: the regions as they are) picked on a scan subset. Returns in-sample scores, nested scores
    (each fold's choice and threshold picked on the other folds' scan images), the picked regions, threshold and merger."""
    every, scan = np.arange(len(oof.images)), oof.subset(scan_n, seed)
    done: dict[tuple[int, float | None], np.ndarray] = {}
    for r in choices:  # made once: the merger's rows and every threshold's scores start from the same superpixels
        oof.make_superpixels(r, workers)
    mergers = [fit_region_merging(oof, weights, r, workers, kind=kind) for r in choices]

    def at(choice: tuple[int, float | None], held: np.ndarray) -> np.ndarray:  # each (choice, threshold, image) scored once
        c, t = choice
        got = done.setdefault(choice, np.full(len(every), np.nan))
        todo = held[np.isnan(got[held])]
        if len(todo):
            if t is not None:
                mergers[c].threshold = t
            got[todo] = oof.scores(weights, PostParams(), mergers[c] if t is not None else None, idx=todo, workers=workers, regions=choices[c])
        return got[held]

    per = {(c, t): at((c, t), scan) for c in range(len(choices)) for t in thresholds}
    for (c, t), v in per.items():
        LOG.debug(f"{_describe(choices[c])}, merge threshold {t}: {v.mean():.4f} OOF ARI on {len(scan)} images")
    best = max(per, key=lambda c: per[c].mean())
    pick = lambda inner: max(per, key=lambda c: per[c][np.isin(scan, inner)].mean())  # noqa: E731
    nested = nested_scores(oof.folds, every, pick, at)
    full = at(best, every)
    merger = mergers[best[0]]
    if best[1] is not None:
        merger.threshold = best[1]
    return full, nested, choices[best[0]], best[1], merger


def _describe(regions: Regions) -> str:
    """How a region candidate is named in progress lines."""
    return f"regions of {RunDir(Path(regions.run)).label}" if regions.run else f"superpixels h {regions.superpixels.h}"


def restrict(space: dict, names: list[str] | None) -> dict:
    """The search space cut to `names` (fewer free parameters: a nested estimate that overfits less)."""
    if not names:
        return dict(space)
    unknown = sorted(set(names) - set(space))
    if unknown:
        raise UserError("--params", f"unknown parameter '{unknown[0]}' (known: {', '.join(space)})")
    return {k: v for k, v in space.items() if k in names}


def _from_params(params: dict, base: PostParams, n_members: int) -> tuple[PostParams, list[float]]:
    """A trial's parameter dict back to PostParams and weights."""
    post = dataclasses.replace(base, **{k: v for k, v in params.items() if k in SPACE})
    weights = [params.get(f"w{j}", 1.0) for j in range(n_members)]
    return post, weights if any(w > 0 for w in weights) else [1.0] * n_members
