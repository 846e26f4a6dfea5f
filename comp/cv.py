"""Cross-validation harness: deterministic folds, per-fold fit/predict, OOF scores, a run folder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from comp.config import Experiment
from comp.contrast import resolve
from comp.errors import UserError, atomic_path, atomic_save_npy, atomic_write_text
from comp.io import Dataset, image_names
from comp.metric import image_scores
from comp.registry import FitContext, FoldData, MapMethod, get_method

RUNS = Path("runs")


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


def _run_key(exp: Experiment, data: Dataset, folds: int) -> str:
    """What a run folder's name ends with: config digest, labels fingerprint, fold count."""
    return f"{exp.digest()}-{data.fingerprint()['y_train'][:6]}-k{folds}"


def _run_dir(exp: Experiment, data: Dataset, folds: int, runs: Path) -> Path:
    """Reuse an unfinished run of the same config and data (resume), else make a new run id."""
    key = _run_key(exp, data, folds)
    base = runs / exp.name
    if base.is_dir():
        for d in sorted(base.iterdir(), reverse=True):
            if d.name.endswith(key) and not (d / "cv.json").exists():
                return d
    while True:  # run ids are one per second: a rerun within the same second waits for the next one
        new = base / f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{key}"
        if not new.exists():
            return new
        time.sleep(0.2)


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
    key = _run_key(exp, data, folds)
    base = runs / exp.name
    done = sorted((d for d in base.iterdir() if d.name.endswith(key) and (d / "cv.json").is_file()), reverse=True) if base.is_dir() else []
    if not done:
        return None
    s = json.loads((done[0] / "cv.json").read_text())
    return CVResult(done[0], s["mean_ari"], s["std_ari"], [f["ari"] for f in s["folds"]])


def run_cv(exp: Experiment, data: Dataset, folds: int | None = None, runs: Path = RUNS, command: str = "") -> CVResult:
    """Fit and predict every fold, score OOF predictions, write the run folder, return the summary (one process per run)."""
    k = folds or exp.cv.folds
    with run_lock(runs / exp.name / f".{_run_key(exp, data, k)}.lock"):
        return _run_cv(exp, data, k, runs, command)


def _run_cv(exp: Experiment, data: Dataset, k: int, runs: Path, command: str) -> CVResult:
    """run_cv's work, under its lock."""
    spec = get_method(exp.method, exp.path)
    ann = data.annotated
    if len(ann) == 0:
        raise UserError(data.root / "Y_train.csv", "no annotated image: cross-validation needs annotations")
    groups = data.groups()
    fold_of = make_folds(len(ann), k, exp.cv.seed, None if groups is None else groups[ann])
    run_dir = _run_dir(exp, data, k, runs)
    (run_dir / "oof").mkdir(parents=True, exist_ok=True)
    contrast = resolve(exp.contrast, data.x_train, exp.path)  # label-free: the slices' histogram only
    print(f"contrast: {exp.contrast.window} -> grey window {contrast.window}" + (f", channels {contrast.channels}" if contrast.channels else ""))
    config = {**exp.to_dict(), "cv": {"folds": k, "seed": exp.cv.seed}, "data": data.fingerprint(), "contrast_resolved": contrast.to_dict()}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    names = image_names(len(data.x_train))
    atomic_write_text(
        run_dir / "folds.csv", "image,index,fold\n" + "".join(f"{names[i]},{i},{f}\n" for i, f in zip(ann, fold_of))
    )
    x_test = data.x_test if data.has_test_images else None
    t0 = time.time()
    for f in range(k):
        done = run_dir / "oof" / f"fold{f}.npz"
        if done.exists():
            print(f"fold {f}: already done, skipped (resuming {run_dir})")
            continue
        tr, va = ann[fold_of != f], ann[fold_of == f]
        method = spec.build(exp.params)
        ctx = FitContext(
            workdir=run_dir / f"fold{f}",
            fold=f,
            seed=exp.cv.seed + f,
            contrast=contrast,
        )
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        tf = time.time()
        method.fit(FoldData(data.x_train[tr], data.y_train[tr], tr), ctx)
        pred = _predict_and_cache(method, data.x_train[va], x_test, run_dir, f)
        scores = image_scores(data.y_train[va], pred)
        fitted = getattr(method, "fitted", None)
        with atomic_path(done, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=va, pred=pred, scores=scores)
        info = {"fold": f, "n": int(len(va)), "ari": float(scores.mean()), "seconds": round(time.time() - tf, 1)}
        if fitted:
            info["fitted"] = fitted
        atomic_write_text(ctx.workdir / "fold.json", json.dumps(info, indent=1))
        print(f"fold {f}: ARI {scores.mean():.4f} on {len(va)} images ({info['seconds']} s)")
    return _summarise(exp, run_dir, k, names, time.time() - t0, command)


def _predict_and_cache(method, x_val: np.ndarray, x_test: np.ndarray | None, run_dir: Path, fold: int) -> np.ndarray:
    """Predict the fold's images; methods with maps get OOF and test maps cached (float16) before post-processing."""
    if not isinstance(method, MapMethod):
        return method.predict(x_val)
    maps = method.predict_maps(x_val)
    atomic_save_npy(run_dir / "oof" / f"fold{fold}_maps.npy", maps)
    if x_test is not None:
        atomic_save_npy(run_dir / "test" / f"fold{fold}_maps.npy", method.predict_maps(x_test))
    return method.postprocess_maps(maps)


def _summarise(exp: Experiment, run_dir: Path, k: int, names: list[str], seconds: float, command: str = "") -> CVResult:
    """Gather the folds' OOF scores into oof_scores.csv and cv.json, and print the table."""
    rows, fold_means, fold_n = [], [], []
    for f in range(k):
        z = np.load(run_dir / "oof" / f"fold{f}.npz")
        fold_means.append(float(z["scores"].mean()))
        fold_n.append(int(len(z["ids"])))
        rows += [(int(i), f, float(s)) for i, s in zip(z["ids"], z["scores"])]
    rows.sort()
    all_scores = np.array([s for _, _, s in rows])
    atomic_write_text(
        run_dir / "oof_scores.csv", "image,fold,ari\n" + "".join(f"{names[i]},{f},{s:.6f}\n" for i, f, s in rows)
    )
    mean, std = float(all_scores.mean()), float(all_scores.std())
    summary = {
        "experiment": exp.name,
        "method": exp.method,
        "dataset": json.loads(json.dumps(yaml.safe_load((run_dir / "config.yaml").read_text())["data"])),
        "folds": [{"fold": f, "n": n, "ari": m} for f, (n, m) in enumerate(zip(fold_n, fold_means))],
        "mean_ari": mean,
        "std_ari": std,
        "fold_std": float(np.std(fold_means)),
        "n_images": len(rows),
        "seconds": round(seconds, 1),
        "command": command,
    }
    atomic_write_text(run_dir / "cv.json", json.dumps(summary, indent=1))
    print(f"\n{exp.name} on {summary['dataset']['name']} ({run_dir})")
    print(f"{'fold':>6} {'images':>7} {'ARI':>8}")
    for f, (n, m) in enumerate(zip(fold_n, fold_means)):
        print(f"{f:>6} {n:>7} {m:>8.4f}")
    print(f"{'mean':>6} {len(rows):>7} {mean:>8.4f}  (image std {std:.4f}, fold std {np.std(fold_means):.4f})")
    return CVResult(run_dir, mean, std, fold_means)
