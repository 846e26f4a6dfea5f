"""Cross-validation harness: deterministic folds, per-fold fit/predict, OOF scores, a run folder."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comp.config import Experiment
from comp.contrast import resolve
from comp.errors import UserError
from comp.io import Dataset, image_names
from comp.metric import image_scores
from comp.registry import FitContext, FoldData, MapMethod, get_method
from comp.rundir import RUNS, RunDir, RunKey, save_maps, write_maps


def make_folds(n: int, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold id (0..k-1) for each of n items; items sharing a group (e.g. a CT volume) share a fold."""
    if k < 2:
        raise UserError("cv.folds", f"need at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    if groups is None:
        if n < k:
            raise UserError("cv.folds", f"{k} folds but only {n} annotated images")
        folds = np.arange(n) % k
        return folds[rng.permutation(n)]
    uniq, inv = np.unique(groups, return_inverse=True)
    if len(uniq) < k:
        raise UserError("cv.folds", f"{k} folds but only {len(uniq)} groups")
    # Largest groups first, each to the currently smallest fold: balanced and deterministic.
    sizes = np.bincount(inv)
    order = sorted(rng.permutation(len(uniq)), key=lambda g: -sizes[g])
    load = np.zeros(k, np.int64)
    gfold = np.empty(len(uniq), np.int64)
    for g in order:
        f = int(np.argmin(load))
        gfold[g] = f
        load[f] += sizes[g]
    return gfold[inv]


@dataclass
class CVResult:
    """Where a CV run was written and its headline numbers."""

    run_dir: Path
    mean: float
    std: float
    fold_means: list[float]


def run_key(exp: Experiment, data: Dataset, folds: int) -> RunKey:
    """What identifies a run: config digest, labels fingerprint, fold count."""
    return RunKey(exp.digest(), data.fingerprint()["y_train"][:6], folds)


def _alive(pid: int) -> bool:
    """Whether a process of this machine still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(path: Path):
    """Hold `path` (pid@host inside) for the duration: a second process of the same run stops with one clear error."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = path.read_text().strip() if path.is_file() else ""
            pid, _, host = holder.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # left by a process that died (kill -9): take it over
                continue
            raise UserError(path, f"this run is in progress in process {holder or '?'}; wait for it (or delete this file if that process is gone)")
    else:
        raise UserError(path, "could not take the run lock")
    os.write(fd, me.encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def finished_run(exp: Experiment, data: Dataset, folds: int, runs: Path = RUNS) -> CVResult | None:
    """The newest finished run of this exact config, data and fold count, if any."""
    done = [r for r in RunDir.of_experiment(runs, exp.name, run_key(exp, data, folds)) if r.finished]
    if not done:
        return None
    s = done[0].summary()
    return CVResult(done[0].path, s["mean_ari"], s["std_ari"], [f["ari"] for f in s["folds"]])


def run_cv(exp: Experiment, data: Dataset, folds: int | None = None, runs: Path = RUNS, command: str = "") -> CVResult:
    """Fit and predict every fold, score OOF predictions, write the run folder, return the summary (one process per run)."""
    k = folds or exp.cv.folds
    with run_lock(RunDir.lock_file(runs, exp.name, run_key(exp, data, k))):
        return _run_cv(exp, data, k, runs, command)


def _run_cv(exp: Experiment, data: Dataset, k: int, runs: Path, command: str) -> CVResult:
    """run_cv's work, under its lock."""
    spec = get_method(exp.method, exp.path)
    ann = data.annotated
    if len(ann) == 0:
        raise UserError(data.root / "Y_train.csv", "no annotated image: cross-validation needs annotations")
    groups = data.groups()
    fold_of = make_folds(len(ann), k, exp.cv.seed, None if groups is None else groups[ann])
    run = RunDir.create(runs, exp.name, run_key(exp, data, k))
    contrast = resolve(exp.contrast, data.x_train, exp.path)  # label-free: the slices' histogram only
    print(f"contrast: {exp.contrast.window} -> grey window {contrast.window}" + (f", channels {contrast.channels}" if contrast.channels else ""))
    config = {**exp.to_dict(), "cv": {"folds": k, "seed": exp.cv.seed}, "data": data.fingerprint(), "contrast_resolved": contrast.to_dict()}
    run.write_config(config)
    names = image_names(len(data.x_train))
    run.write_folds(names, ann, fold_of)
    x_test = data.x_test if data.has_test_images else None
    t0 = time.time()
    for f in range(k):
        if run.fold_done(f):
            print(f"fold {f}: already done, skipped (resuming {run.path})")
            continue
        tr, va = ann[fold_of != f], ann[fold_of == f]
        method = spec.build(exp.params)
        ctx = FitContext(
            workdir=run.fold_dir(f),
            fold=f,
            seed=exp.cv.seed + f,
            contrast=contrast,
        )
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        tf = time.time()
        method.fit(FoldData(data.x_train[tr], data.y_train[tr], tr, None if groups is None else groups[tr]), ctx)
        pred = _predict_and_cache(method, data.x_train[va], x_test, run, f)
        scores = image_scores(data.y_train[va], pred)
        fitted = getattr(method, "fitted", None)
        info = {"fold": f, "n": int(len(va)), "ari": float(scores.mean()), "seconds": round(time.time() - tf, 1)}
        if fitted:
            info["fitted"] = fitted
        run.write_fold(f, va, pred, scores, info)
        print(f"fold {f}: ARI {scores.mean():.4f} on {len(va)} images ({info['seconds']} s)")
    return _summarise(exp, run, k, names, time.time() - t0, command)


def _predict_and_cache(method, x_val: np.ndarray, x_test: np.ndarray | None, run: RunDir, fold: int) -> np.ndarray:
    """Predict the fold's images; methods with maps get OOF and test maps cached (uint8-quantised) before post-processing."""
    if not isinstance(method, MapMethod):
        return method.predict(x_val)
    save_maps(run.oof_maps_file(fold), method.predict_maps(x_val))
    if x_test is not None:  # a chunk of test slices at a time: memory does not grow with the test set
        write_maps(run.test_maps_file(fold), len(x_test), lambda sl: method.predict_maps(x_test[sl]))
    # Post-processed from the cached (quantised) maps: the OOF score is what ensembling and tuning will see.
    return method.postprocess_maps(run.oof_maps(fold))


def _summarise(exp: Experiment, run: RunDir, k: int, names: list[str], seconds: float, command: str = "") -> CVResult:
    """Gather the folds' OOF scores into oof_scores.csv and cv.json, and print the table."""
    rows, fold_means, fold_n = [], [], []
    for f in range(k):
        z = run.fold_pack(f)
        fold_means.append(float(z["scores"].mean()))
        fold_n.append(int(len(z["ids"])))
        rows += [(int(i), f, float(s)) for i, s in zip(z["ids"], z["scores"])]
    rows.sort()
    all_scores = np.array([s for _, _, s in rows])
    run.write_scores([(names[i], f, s) for i, f, s in rows])
    mean, std = float(all_scores.mean()), float(all_scores.std())
    summary = {
        "experiment": exp.name,
        "method": exp.method,
        "dataset": run.config()["data"],
        "folds": [{"fold": f, "n": n, "ari": m} for f, (n, m) in enumerate(zip(fold_n, fold_means))],
        "mean_ari": mean,
        "std_ari": std,
        "fold_std": float(np.std(fold_means)),
        "n_images": len(rows),
        "seconds": round(seconds, 1),
        "command": command,
    }
    run.write_summary(summary)
    print(f"\n{exp.name} on {summary['dataset']['name']} ({run.path})")
    print(f"{'fold':>6} {'images':>7} {'ARI':>8}")
    for f, (n, m) in enumerate(zip(fold_n, fold_means)):
        print(f"{f:>6} {n:>7} {m:>8.4f}")
    print(f"{'mean':>6} {len(rows):>7} {mean:>8.4f}  (image std {std:.4f}, fold std {np.std(fold_means):.4f})")
    return CVResult(run.path, mean, std, fold_means)
