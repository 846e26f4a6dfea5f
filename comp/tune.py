"""Optuna search of post-processing (and ensemble weights) on cached OOF maps, then learned region merging.

Studies live in an RDB storage (SQLite under runs/tune/ by default, PostgreSQL for several workers) and
resume after a kill: the target is a number of *complete* trials, counted across every worker. The best
result goes into the ensemble file only when it beats the score already stored there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comp.contrast import Contrast
from comp.ensemble import OOF, EnsembleSpec, merger_path, oof_ids, save_ensemble
from comp.errors import UserError
from comp.merge import Merger, fit_fold_mergers, pair_features, pair_targets, save_merger
from comp.metric import image_scores
from comp.parallel import pmap
from comp.postprocess import PostParams, upsample_maps
from comp.registry import MethodSpec

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
# The contrast window of a non-learned method: its low end and width in input grey levels.
WINDOW_LO, WINDOW_WIDTH = (0.0, 230.0), (12.0, 255.0)
MERGE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCAN_IMAGES = 80


@dataclass
class TuneResult:
    """What one `comp tune` call found and whether it was stored."""

    best_trial_ari: float
    oof_ari: float
    oof_ari_no_merge: float
    merge_threshold: float | None
    stored: bool
    trials_complete: int
    trials_per_minute: float


def storage_url(storage: str | None, name: str, runs: Path) -> str:
    """The study storage: given URL, else SQLite at runs/tune/NAME.db."""
    if storage:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the pinned driver is psycopg2.
        return "postgresql+psycopg2://" + storage[len("postgresql://") :] if storage.startswith("postgresql://") else storage
    (runs / "tune").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(runs / 'tune' / f'{name}.db').resolve()}"


def study_name(spec: EnsembleSpec, images: int) -> str:
    """A study per (ensemble members, image subset): other members make a different objective."""
    key = "|".join(m.run for m in spec.members) + f"|{images}|{spec.post.mode}"
    return f"{spec.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def open_study(url: str, name: str, seed: int):
    """Create or load a maximising study whose dead workers' trials are failed after a grace period."""
    import optuna

    import warnings

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=30)
            break
        except Exception as exc:  # bad URL, server down, missing driver; or a race on a new database's schema
            if ("UniqueViolation" in str(exc) or "UNIQUE constraint failed" in str(exc)) and attempt < 4:  # PostgreSQL, SQLite
                time.sleep(0.5 + attempt)  # another worker is creating the tables: try again once it is done
                continue
            raise UserError(url.split("@")[-1], f"cannot open the study storage ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)
    return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler, load_if_exists=True)


def suggest_space(trial, space: dict[str, tuple[float, float, bool]], params_type: type) -> dict:
    """One trial's values of a (low, high, log) search space; integer fields of `params_type` get integers."""
    types = {f.name: f.type for f in dataclasses.fields(params_type)}
    return {
        name: trial.suggest_int(name, int(lo), int(hi), log=log) if types[name] in (int, "int") else trial.suggest_float(name, lo, hi, log=log)
        for name, (lo, hi, log) in space.items()
    }


def suggest(trial, base: PostParams, n_members: int, has_embedding: bool) -> tuple[PostParams, list[float]]:
    """Post-processing parameters and ensemble weights for one trial."""
    space = {k: v for k, v in SPACE.items() if (k != "merge_embedding" or has_embedding)
             and (base.mode != "cc" or k in ("fg_threshold", "min_size", "smooth"))}  # fmt: skip
    values = suggest_space(trial, space, PostParams)
    weights = [trial.suggest_float(f"w{j}", 0.0, 1.0) for j in range(n_members)] if n_members > 1 else [1.0]
    if not any(w > 0 for w in weights):
        weights = [1.0] * n_members
    return dataclasses.replace(base, **values), weights


def start_params(spec: EnsembleSpec, has_embedding: bool) -> dict:
    """The stored settings as a trial, so the search starts from (and can only improve on) them."""
    p = {k: getattr(spec.post, k) for k in SPACE if has_embedding or k != "merge_embedding"}
    if spec.post.mode == "cc":
        p = {k: v for k, v in p.items() if k in ("fg_threshold", "min_size", "smooth")}
    lo_hi = {k: SPACE[k][:2] for k in p}
    p = {k: min(max(v, lo_hi[k][0]), lo_hi[k][1]) for k, v in p.items()}
    if len(spec.members) > 1:
        top = max(m.weight for m in spec.members)
        p.update({f"w{j}": m.weight / top for j, m in enumerate(spec.members)})
    return p


def _pair_rows(item: tuple, weights: list[float], post: PostParams) -> tuple[np.ndarray, np.ndarray]:
    """Merge-classifier rows (features, targets) of one OOF image."""
    from comp.ensemble import blend, segment

    maps, image, truth, _ = item
    m = upsample_maps(blend(maps, weights), image.shape[-1])  # once: segment() keeps maps already at full size
    labels = segment(m, image, post)
    pairs, x = pair_features(labels, m, image)
    return x, pair_targets(labels, truth, pairs)


def fit_merging(oof: OOF, weights: list[float], post: PostParams, workers: int = 0) -> Merger:
    """Fold-disciplined pair classifiers trained on the OOF regions of the tuned post-processing."""
    rows = pmap(_pair_rows, oof.items(np.arange(len(oof.images)), range(len(oof.members))), weights, post, workers=workers, desc="merge features")
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    folds = np.concatenate([np.full(len(r[1]), f) for r, f in zip(rows, oof.folds)])
    print(f"merge classifier: {len(y)} region pairs, {int(y.sum())} to merge", flush=True)
    return fit_fold_mergers(x, y, folds)


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
) -> TuneResult:
    """Run the study to `trials` complete trials, score its best on every OOF image, add merging, store if better."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    has_emb = all(m.maps.shape[1] > 3 for m in oof.members)
    idx = oof.subset(images, seed)
    study = open_study(storage_url(storage, spec.name, runs), study_name(spec, images), seed)
    study.enqueue_trial(start_params(spec, has_emb), skip_if_exists=True)

    def objective(trial) -> float:
        post, weights = suggest(trial, spec.post, len(oof.members), has_emb)
        return float(oof.scores(weights, post, idx=idx, workers=workers).mean())

    def report(study, trial) -> None:
        if trial.state == TrialState.COMPLETE:
            print(f"trial {trial.number}: OOF ARI {trial.value:.4f} (best {study.best_value:.4f})", flush=True)

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    t0, before = time.time(), complete()
    left = trials - before
    if left > 0:
        print(f"study {study.study_name}: {before} complete trials, running {left} more on {len(idx)} OOF images", flush=True)
        stop = optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,))
        study.optimize(objective, n_trials=left, callbacks=[report, stop])
    done = complete()
    rate = (done - before) / max((time.time() - t0) / 60, 1e-9)
    best = study.best_trial
    post, weights = _from_params(best.params, spec.post, len(oof.members))
    full = oof.scores(weights, post, workers=workers, desc="score best on all OOF images")
    no_merge, final, threshold = float(full.mean()), full, None
    if merge:
        merger = fit_merging(oof, weights, post, workers)
        scan = oof.subset(SCAN_IMAGES, seed)  # the threshold scan on a subset, the winner on every image
        base = full[scan].mean()
        gains = {}
        for t in MERGE_THRESHOLDS:
            merger.threshold = t
            gains[t] = oof.scores(weights, post, merger, idx=scan, workers=workers).mean() - base
            print(f"merge threshold {t}: {gains[t]:+.4f} OOF ARI on {len(scan)} images", flush=True)
        t_best = max(gains, key=gains.get)
        if gains[t_best] > 0:
            merger.threshold = t_best
            merged = oof.scores(weights, post, merger, workers=workers, desc="score merging on all OOF images")
            print(f"merging at {t_best}: OOF ARI {merged.mean():.4f} (without merging {no_merge:.4f})", flush=True)
            if merged.mean() > no_merge + 1e-6:
                final, threshold = merged, t_best
    new_ari = float(final.mean())
    stored = spec.oof_ari is None or new_ari > spec.oof_ari + 1e-9
    if stored:
        total = sum(weights)
        for m, w in zip(spec.members, weights):
            m.weight = round(w / total, 6)
        spec.post = post
        spec.merge.enabled = threshold is not None
        spec.merge.threshold = threshold if threshold is not None else spec.merge.threshold
        spec.oof_ari, spec.oof_std, spec.oof_ari_no_merge = new_ari, float(final.std()), no_merge
        if threshold is not None:
            merger.threshold = threshold
            save_merger(merger, merger_path(spec.name, runs))
        save_ensemble(spec, runs)
    return TuneResult(float(best.value), new_ari, no_merge, threshold, stored, done, rate)


def _from_params(params: dict, base: PostParams, n_members: int) -> tuple[PostParams, list[float]]:
    """A trial's parameter dict back to PostParams and weights."""
    post = dataclasses.replace(base, **{k: v for k, v in params.items() if k in SPACE})
    weights = [params.get(f"w{j}", 1.0) for j in range(n_members)]
    return post, weights if any(w > 0 for w in weights) else [1.0] * n_members


def fold_fitted(run: Path) -> list[dict]:
    """The distinct parameter values a run's folds fitted (fold{k}/fold.json 'fitted'), if any."""
    seen = []
    for f in sorted(run.glob("fold*/fold.json")):
        fitted = json.loads(f.read_text()).get("fitted") or {}
        if fitted and fitted not in seen:
            seen.append(fitted)
    return seen


def _method_trial(trial, spec: MethodSpec, params, contrast: Contrast) -> tuple[object, Contrast]:
    """A trial's method parameters (the method's declared space, plus the params that make fit a no-op) and window."""
    values = suggest_space(trial, spec.space, type(params))
    lo = trial.suggest_float("window_lo", WINDOW_LO[0], WINDOW_LO[1])
    width = trial.suggest_float("window_width", WINDOW_WIDTH[0], WINDOW_WIDTH[1], log=True)
    return dataclasses.replace(params, **values, **spec.fixed), Contrast((round(lo, 2), round(lo + width, 2)), contrast.channels)


def _method_start(spec: MethodSpec, params, contrast: Contrast) -> dict:
    """The run's own settings as the first trial, clipped into the search space."""
    p = {k: min(max(getattr(params, k), lo), hi) for k, (lo, hi, _) in spec.space.items()}
    lo, hi = contrast.window
    p["window_lo"] = min(max(lo, WINDOW_LO[0]), WINDOW_LO[1])
    p["window_width"] = min(max(hi - lo, WINDOW_WIDTH[0]), WINDOW_WIDTH[1])
    return p


def method_scores(exp, contrast: Contrast, x: np.ndarray, y: np.ndarray, spec: MethodSpec | None = None) -> np.ndarray:
    """Per-image ARI of a method that needs no fitting (fixed pipeline or tuned settings) behind a contrast step."""
    from comp.registry import FitContext, FoldData, get_method

    spec = spec or get_method(exp.method, exp.path)
    method = spec.build(exp.params)
    method.fit(FoldData(x[:0], y[:0], np.zeros(0, np.int64)), FitContext(Path("."), -1, 0, contrast=contrast))
    return image_scores(y, method.predict(x))


def tune_method(spec_file: EnsembleSpec, data, runs: Path, trials: int = 40, storage: str | None = None, images: int = 0,
                seed: int = 0) -> TuneResult:  # fmt: skip
    """Optuna over a non-learned run's declared parameters and its contrast window, scored on the run's OOF images."""
    import optuna
    from optuna.trial import TrialState

    from comp.ensemble import run_experiment
    from comp.registry import get_method

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = Path(spec_file.members[0].run)
    exp, contrast = run_experiment(run, spec_file.overrides)
    spec = get_method(exp.method, run)
    if not spec.space:
        raise UserError(run, f"method '{exp.method}' declares nothing to tune")
    ids = oof_ids(run)
    x, y = data.x_train[ids], data.y_train[ids]
    idx = np.arange(len(ids)) if images <= 0 or images >= len(ids) else np.sort(np.random.default_rng(seed).permutation(len(ids))[:images])
    key = f"{run}|{exp.method}|{images}|method"
    study = open_study(storage_url(storage, spec_file.name, runs), f"{spec_file.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}", seed)
    # Start from the run's settings and from what each fold fitted, so the search begins where CV ended.
    for fitted in [{}, *fold_fitted(run)]:
        study.enqueue_trial(_method_start(spec, dataclasses.replace(exp.params, **fitted), contrast), skip_if_exists=True)
    if spec_file.oof_ari is None:  # the bar: the run's own out-of-fold CV score
        spec_file.oof_ari = float(json.loads((run / "cv.json").read_text())["mean_ari"])
        print(f"to beat: the run's own CV ARI {spec_file.oof_ari:.4f}", flush=True)

    def objective(trial) -> float:
        params, c = _method_trial(trial, spec, exp.params, contrast)
        return float(method_scores(dataclasses.replace(exp, params=params), c, x[idx], y[idx], spec).mean())

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    t0, before = time.time(), complete()
    if trials > before:
        print(f"study {study.study_name}: {before} complete trials, running {trials - before} more on {len(idx)} OOF images "
              f"(method parameters and contrast window)", flush=True)  # fmt: skip
        stop = optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,))
        report = lambda st, t: t.state == TrialState.COMPLETE and print(f"trial {t.number}: OOF ARI {t.value:.4f} (best {st.best_value:.4f})", flush=True)  # noqa: E731
        study.optimize(objective, n_trials=trials - before, callbacks=[report, stop])
    done = complete()
    rate = (done - before) / max((time.time() - t0) / 60, 1e-9)
    best = study.best_trial
    params, c = _method_trial(optuna.trial.FixedTrial(best.params), spec, exp.params, contrast)
    scores = method_scores(dataclasses.replace(exp, params=params), c, x, y, spec)
    full = float(scores.mean())
    stored = spec_file.oof_ari is None or full > spec_file.oof_ari + 1e-9
    if stored:
        names = [*spec.space, *spec.fixed]
        spec_file.overrides = {**{f"params.{k}": getattr(params, k) for k in names}, "contrast.window": list(c.window)}
        spec_file.oof_ari = spec_file.oof_ari_no_merge = full
        spec_file.oof_std = float(scores.std())
        save_ensemble(spec_file, runs)
    return TuneResult(float(best.value), float(full), float(full), None, stored, done, rate)
