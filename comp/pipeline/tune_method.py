"""Tuning a method's own parameters (and its contrast window) on the annotated slices, fold by fold."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from comp.core.errors import UserError
from comp.core.log import LOG
from comp.core.metric import image_scores
from comp.data.contrast import Contrast
from comp.methods.base import FitContext, FoldData
from comp.methods.merge import MergeKind
from comp.methods.registry import MethodSpec, get_method
from comp.pipeline.ensemble import EnsembleSpec, save_ensemble
from comp.pipeline.oof import OOF, has_maps, oof_index, random_subset, run_experiment
from comp.pipeline.select import nested_scores
from comp.pipeline.study import hold_trial, inner_study, open_study, run_study, storage_url, suggest_space
from comp.pipeline.tune import TuneResult, record_command, restrict, tune
from comp.pipeline.workspace import RunDir


# The contrast window of a non-learned method: its low end and width in input grey levels.
WINDOW_LO, WINDOW_WIDTH = (0.0, 230.0), (12.0, 255.0)


def fold_fitted(run: Path) -> list[dict]:
    """The distinct parameter values a run's folds fitted (fold{k}/fold.json 'fitted'), if any."""
    seen = []
    for info in RunDir(Path(run)).fold_infos():
        fitted = info.get("fitted") or {}
        if fitted and fitted not in seen:
            seen.append(fitted)
    return seen


def _method_trial(trial, spec: MethodSpec, params, contrast: Contrast) -> tuple[object, Contrast]:
    """A trial's method parameters (the method's declared space, plus the params that make fit a no-op) and window."""
    values = suggest_space(trial, spec.space, type(params))
    lo = trial.suggest_float("window_lo", WINDOW_LO[0], WINDOW_LO[1])
    width = trial.suggest_float("window_width", WINDOW_WIDTH[0], WINDOW_WIDTH[1], log=True)
    return dataclasses.replace(params, **values, **spec.fixed), contrast.with_window((round(lo, 2), round(lo + width, 2)))


def _method_start(spec: MethodSpec, params, contrast: Contrast) -> dict:
    """The run's own settings as the first trial, clipped into the search space."""
    p = {k: min(max(getattr(params, k), lo), hi) for k, (lo, hi, _) in spec.space.items()}
    lo, hi = contrast.window
    p["window_lo"] = min(max(lo, WINDOW_LO[0]), WINDOW_LO[1])
    p["window_width"] = min(max(hi - lo, WINDOW_WIDTH[0]), WINDOW_WIDTH[1])
    return p


def method_scores(exp, contrast: Contrast, x: np.ndarray, y: np.ndarray, spec: MethodSpec | None = None) -> np.ndarray:
    """Per-image ARI of a method that needs no fitting (fixed pipeline or tuned settings) behind a contrast step."""

    spec = spec or get_method(exp.method, exp.path)
    method = spec.build(exp.params)
    method.fit(FoldData(x[:0], y[:0], np.zeros(0, np.int64)), FitContext(Path("."), -1, 0, contrast=contrast))
    return image_scores(y, method.predict(x))


def tune_method(spec_file: EnsembleSpec, data, runs: Path, trials: int = 40, storage: str | None = None, images: int = 0,
                seed: int = 0, params: list[str] | None = None, command: str = "") -> TuneResult:  # fmt: skip
    """Optuna over a non-learned run's declared parameters and its contrast window on the run's OOF images, nested too.

    The bar is the run's own CV ARI (its folds fitted on their training images only); the tuned settings are
    stored only when their nested estimate (each fold scored with a search on the other folds) beats it.
    """
    import optuna


    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = Path(spec_file.members[0].run)
    exp, contrast = run_experiment(run, spec_file.overrides)
    spec = get_method(exp.method, run)
    if not spec.space:
        raise UserError(run, f"method '{exp.method}' declares nothing to tune")
    spec = dataclasses.replace(spec, space=restrict(spec.space, params))
    ids, folds = oof_index(run)
    x, y = data.x_train[ids], data.y_train[ids]
    idx = random_subset(len(ids), images, seed)
    key = f"{run}|{exp.method}|{images}|method|{sorted(spec.space)}"
    study = open_study(storage_url(storage, spec_file.name, runs), f"{spec_file.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}", seed)
    # Start from the run's settings and from what each fold fitted, so the search begins where CV ended.
    starts = [_method_start(spec, dataclasses.replace(exp.params, **fitted), contrast) for fitted in [{}, *fold_fitted(run)]]
    for start in starts:
        study.enqueue_trial(start, skip_if_exists=True)
    cv_ari = float(RunDir(run).summary()["mean_ari"])
    bar = cv_ari if spec_file.nested_ari is None else spec_file.nested_ari
    what = "the run's own CV ARI" if spec_file.nested_ari is None else "the stored nested estimate"
    LOG.info(f"to beat: {what} {bar:.4f}")

    def scores_of(trial, sub: np.ndarray) -> np.ndarray:  # a live trial, or a FixedTrial replaying found parameters
        params_, c = _method_trial(trial, spec, exp.params, contrast)
        return method_scores(dataclasses.replace(exp, params=params_), c, x[sub], y[sub], spec)

    def objective_on(sub: np.ndarray) -> Callable:
        def objective(trial) -> float:
            hold_trial(trial)
            return float(scores_of(trial, sub).mean())

        return objective

    def replay(p: dict, sub: np.ndarray) -> np.ndarray:
        return scores_of(optuna.trial.FixedTrial(p), sub)

    done, rate = run_study(study, objective_on(idx), trials, f"{len(idx)} OOF images (method parameters and contrast window)")
    best = study.best_trial
    every = np.arange(len(ids))
    scores = replay(best.params, every)
    LOG.info(f"nested estimate: {len(np.unique(folds))} searches of {trials} trials, each on the other folds' images")
    nested = nested_scores(folds, every, lambda inner: inner_study(objective_on(inner), starts, trials, seed), replay)
    LOG.info(f"tuned: in-sample {scores.mean():.4f}, nested {nested.mean():.4f} (the run's CV ARI {cv_ari:.4f})")
    stored = nested.mean() > bar + 1e-9
    if stored:
        params_, c = _method_trial(optuna.trial.FixedTrial(best.params), spec, exp.params, contrast)
        _store_method(spec_file, runs, command, {k: getattr(params_, k) for k in [*spec.space, *spec.fixed]}, c.window, scores, nested)
    return TuneResult(float(best.value), float(scores.mean()), float(scores.mean()), None, stored, done, rate, float(nested.mean()), cv_ari,
                      bar=bar)  # fmt: skip


def _store_method(spec_file: EnsembleSpec, runs: Path, command: str, params: dict, window, scores: np.ndarray,
                  nested: np.ndarray) -> None:  # fmt: skip
    """Write a tuned non-learned method's parameters and window into its ensemble file as overrides, with their scores."""
    spec_file.overrides = {**{f"params.{k}": v for k, v in params.items()}, "contrast.window": list(window)}
    spec_file.oof_ari = spec_file.oof_ari_no_merge = float(scores.mean())
    spec_file.oof_std = float(scores.std())
    spec_file.nested_ari = float(nested.mean())
    record_command(spec_file, command)
    save_ensemble(spec_file, runs)


def tune_spec(spec: EnsembleSpec, single: bool, data, runs: Path, trials: int, storage: str | None, images: int, workers: int,
              merge: bool, seed: int, params: list[str] | None, superpixels: bool, region_runs: list[Path], command: str,
              kind: MergeKind) -> TuneResult:  # fmt: skip
    """Tune an ensemble's post-processing, weights and merging on its members' OOF maps, or (a one-member ensemble of
    a method without maps) the method's own parameters and contrast window; every merger fitted is of `kind`."""
    if len(spec.members) == 1 and not has_maps(Path(spec.members[0].run)):
        return tune_method(spec, data, runs, trials, storage, images, seed, params, command)
    oof = OOF.load([Path(m.run) for m in spec.members], data)  # a run without maps stops here, before anything is saved
    if single:
        save_ensemble(spec, runs)
    return tune(spec, oof, runs, trials, storage, images, workers, merge, seed, params, superpixels, region_runs, command, kind)
