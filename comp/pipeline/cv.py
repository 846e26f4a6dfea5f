"""Cross-validation harness: deterministic folds, per-fold fit/predict, OOF scores, a run folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comp.core.claims import claim, me, run_lock
from comp.core.errors import UserError
from comp.core.log import LOG, result
from comp.core.machine import machine
from comp.core.metric import group_means, image_scores
from comp.core.store import save_maps, write_maps
from comp.data.contrast import resolve
from comp.data.dataset import Dataset
from comp.data.groups import fold_groups
from comp.data.images import image_names
from comp.data.sets import extra_data, labels_key
from comp.methods.base import FitContext, FoldData, MapMethod
from comp.methods.registry import get_method
from comp.pipeline.config import Experiment, load_experiment
from comp.pipeline.pseudo import check_folds, pseudo_labels
from comp.pipeline.workspace import RUNS, RunDir, RunKey


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
    """What identifies a run: config digest, labels fingerprint (the extra training data's folded in), fold count."""
    return RunKey(exp.digest(), labels_key(data, exp.cv.extra), folds)


def split(exp: Experiment, data: Dataset, k: int, say=LOG.info) -> tuple[np.ndarray | None, np.ndarray]:
    """The run's split: every training slice's group (None: random folds) and each annotated slice's fold."""
    groups = fold_groups(exp.cv.groups, data, say)
    return groups, make_folds(len(data.annotated), k, exp.cv.seed, None if groups is None else groups[data.annotated])


def finished_run(exp: Experiment, data: Dataset, folds: int, runs: Path = RUNS) -> CVResult | None:
    """The newest finished run of this exact config, data and fold count whose folds are the ones the data's groups
    give now (groups.csv, or scans inferred from the slices, may have moved since), if any."""
    done = [r for r in RunDir.of_experiment(runs, exp.name, run_key(exp, data, folds)) if r.finished]
    if not done:
        return None
    fold_of = split(exp, data, folds, lambda *_: None)[1]
    for r in done:
        ids, fixed = r.folds()
        if np.array_equal(ids, data.annotated) and np.array_equal(fixed, fold_of):
            s = r.summary()
            return CVResult(r.path, s["mean_ari"], s["std_ari"], [f["ari"] for f in s["folds"]])
        LOG.info(f"{r.path}: finished on other folds than the data's groups give now: not reused")
    return None


def teacher_run(exp: Experiment, data: Dataset, folds: int, runs: Path = RUNS) -> RunDir | None:
    """The finished CV run of the experiment's pseudo-label teacher (cross-validated first when there is none)."""

    if not exp.pseudo.enabled:
        return None
    teacher = load_experiment(exp.pseudo.teacher, exp.pseudo.teacher_set)
    # Teachers may have teachers (rounds of self-training); a loop back would cross-validate forever.
    chain, node = [exp], teacher
    while True:
        if any(node.name == e.name and node.digest() == e.digest() for e in chain):
            raise UserError(exp.path, "'pseudo.teacher' leads back to itself: " + " -> ".join(e.name for e in [*chain, node]))
        # Before any teacher is cross-validated: only a method that predicts maps can label slices with confidence.
        if not isinstance(get_method(node.method, node.path).build(node.params), MapMethod):
            raise UserError(chain[-1].path, f"'pseudo.teacher' {node.name} is a '{node.method}' method, which predicts no maps "
                            "to label slices with: a teacher must be a network experiment (method unet)")  # fmt: skip
        if not node.pseudo.enabled:
            break
        chain, node = [*chain, node], load_experiment(node.pseudo.teacher, node.pseudo.teacher_set)
    res = finished_run(teacher, data, folds, runs)
    if res is None:
        LOG.info(f"pseudo-labels: cross-validating the teacher {teacher.name} first")
        sets = "".join(f" --set {s}" for s in exp.pseudo.teacher_set)
        res = run_cv(teacher, data, folds, runs, command=f"python -m comp cv {exp.pseudo.teacher} --folds {folds}{sets}")
    if res is None:
        raise UserError(runs / teacher.name, "the teacher's folds are in progress in another process: run this when it is done")
    return RunDir(res.run_dir)


def run_cv(exp: Experiment, data: Dataset, folds: int | None = None, runs: Path = RUNS, command: str = "",
           only: int | None = None) -> CVResult | None:  # fmt: skip
    """Fit and score the run's folds, each claimed first, so processes (GPUs, machines) sharing `runs` split them.

    `only`: just that fold (`--fold K`). The process that lands the last fold summarises the run and gets its
    CVResult; one that leaves folds to others returns None."""
    k = exp.cv.folds if folds is None else folds  # `--folds 0` is an error (make_folds), not the default
    if only is not None and not 0 <= only < k:
        raise UserError("--fold", f"fold {only} of a {k}-fold run (folds are 0..{k - 1})")
    spec = get_method(exp.method, exp.path)
    if isinstance(spec.build(exp.params), MapMethod):  # a network: a GPU asked for and missing stops it before any folder is written
        from comp.core.runtime import device  # deferred: imports torch

        device(getattr(getattr(exp.params, "train", None), "device", "auto"))
    ann = data.annotated
    if len(ann) == 0:
        raise UserError(data.root / "Y_train.csv", "no annotated image: cross-validation needs annotations")
    extra = extra_data(exp.cv.extra, data, exp.contrast.per_slice)  # checked before any run folder is written
    groups, fold_of = split(exp, data, k)
    contrast = resolve(exp.contrast, data.x_train, exp.path)  # label-free: the slices' histogram only
    LOG.info(f"contrast: {exp.contrast.window} -> grey window {contrast.window}" + (f", channels {contrast.channels}" if contrast.channels else ""))
    names = image_names(len(data.x_train))
    teacher = teacher_run(exp, data, k, runs)
    if teacher is not None:
        check_folds(teacher, ann, fold_of)  # fold k's student learns only from labels of a model blind to fold k
    key = run_key(exp, data, k)
    lock = RunDir.lock_file(runs, exp.name, key)
    with run_lock(lock):  # every process of this run agrees on one folder
        run = _open_run(RunDir.create(runs, exp.name, key), exp, data, k, fold_of, extra, contrast)
    x_test = data.x_test if data.has_test_images else None
    t0 = time.time()
    todo = list(range(k)) if only is None else [only]
    for n, f in enumerate(todo):
        if run.fold_done(f):
            LOG.info(f"fold {f}: already done, skipped ({run.path})")
            continue
        with claim(run.claim_file(f)) as holder:
            if holder is not None:
                LOG.info(f"fold {f}: in progress in process {holder}, skipped")
                continue
            if run.fold_done(f):  # landed between the check and the claim
                continue
            tr, va = ann[fold_of != f], ann[fold_of == f]
            left = sum(not run.fold_done(g) for g in todo[n + 1 :])
            pseudo = None if teacher is None else pseudo_labels(teacher, f, data.x_train, data.unlabelled, exp.pseudo)
            _fit_fold(spec.build(exp.params), FitContext(run.fold_dir(f), f, exp.cv.fold_seed(f), contrast, left),
                      FoldData(data.x_train[tr], data.y_train[tr], tr, None if groups is None else groups[tr], pseudo).with_extra(extra),
                      data.x_train[va], data.y_train[va], va, x_test, run)  # fmt: skip
    missing = [f for f in range(k) if not run.fold_done(f)]
    if missing:
        LOG.info(f"run {run.path}: folds {missing} not done here (other processes, or later `--fold` runs); "
              "the process that lands the last fold summarises the run")  # fmt: skip
        return None
    with run_lock(lock):
        if run.finished:  # another process summarised it
            s = run.summary()
            return CVResult(run.path, s["mean_ari"], s["std_ari"], [g["ari"] for g in s["folds"]])
        return _summarise(exp, run, k, names, time.time() - t0, command, groups)


def _open_run(run: RunDir, exp: Experiment, data: Dataset, k: int, fold_of: np.ndarray, extra, contrast) -> RunDir:
    """A new run folder gets its config and folds; a resumed one must have the same test slices and folds (under the
    run's lock)."""
    ann = data.annotated
    if run.config_file.is_file():  # resuming: its cached test maps must all come from the same test slices
        began = (run.config().get("data") or {}).get("x_test")
        if began is not None and began != data.test_digest:
            raise UserError(run.path, "the test slices changed since this run began (its finished folds cached test maps of "
                            "the others): restore them, or delete this unfinished run folder to start again")  # fmt: skip
        ids, fixed = run.folds()
        if not (np.array_equal(ids, ann) and np.array_equal(fixed, fold_of)):  # folds of two splits would overlap
            raise UserError(run.path, "its folds (folds.csv) are not the ones the data's groups give now (groups.csv changed, "
                            "or inferred groups moved with the slices): restore them, or delete this run folder to start again")  # fmt: skip
        return run
    d = exp.to_dict()  # its cv keys as the digest spells them, with the fold count this run was asked for
    fp = {**data.fingerprint(), **({"extra": extra.sources} if extra else {})}
    run.write_config({**d, "cv": {**d["cv"], "folds": k}, "data": fp, "contrast_resolved": contrast.to_dict()})
    run.write_folds(image_names(len(data.x_train)), ann, fold_of)
    return run


def _fit_fold(method, ctx: FitContext, train: FoldData, x_val: np.ndarray, y_val: np.ndarray, ids: np.ndarray,
              x_test: np.ndarray | None, run: RunDir) -> None:  # fmt: skip
    """Fit one fold, predict and score its held-out images, write its OOF pack and fold.json."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    tf = time.time()
    method.fit(train, ctx)
    pred = _predict_and_cache(method, x_val, x_test, run, ctx.fold)
    scores = image_scores(y_val, pred)
    info = {"fold": ctx.fold, "n": int(len(ids)), "ari": float(scores.mean()), "seconds": round(time.time() - tf, 1),
            "host": me()}  # fmt: skip
    fitted = getattr(method, "fitted", None)
    if fitted:
        info["fitted"] = fitted
    run.write_fold(ctx.fold, ids, pred, scores, info)
    LOG.info(f"fold {ctx.fold}: ARI {scores.mean():.4f} on {len(ids)} images ({info['seconds']} s)")


def _predict_and_cache(method, x_val: np.ndarray, x_test: np.ndarray | None, run: RunDir, fold: int) -> np.ndarray:
    """Predict the fold's images; methods with maps get OOF and test maps cached (uint8-quantised) before post-processing."""
    if not isinstance(method, MapMethod):
        return method.predict(x_val)
    save_maps(run.oof_maps_file(fold), method.predict_maps(x_val))
    if x_test is not None:  # a chunk of test slices at a time: memory does not grow with the test set
        write_maps(run.test_maps_file(fold), len(x_test), lambda sl: method.predict_maps(x_test[sl]))
    # Post-processed from the cached (quantised) maps: the OOF score is what ensembling and tuning will see.
    return method.postprocess_maps(run.oof_maps(fold))


def group_scores(ids: np.ndarray, scores: np.ndarray, groups: np.ndarray | None, folds: np.ndarray) -> dict:
    """Mean ARI per CV group (a scan's block; the fold where folds are random), and the standard error of their mean:
    the spread a choice between two candidates is judged against."""
    keys = folds.astype(str) if groups is None else np.asarray(groups)[ids].astype(str)
    uniq, means, se = group_means(scores, keys)
    return {"by": "fold" if groups is None else "group", "se": se,
            "groups": [{"group": g, "n": int((keys == g).sum()), "ari": float(m)} for g, m in zip(uniq, means)]}  # fmt: skip


def _summarise(exp: Experiment, run: RunDir, k: int, names: list[str], seconds: float, command: str = "",
               groups: np.ndarray | None = None) -> CVResult:  # fmt: skip
    """Gather the folds' OOF scores into oof_scores.csv and cv.json (per group too), and print the table."""
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
        "per_group": group_scores(np.array([i for i, _, _ in rows]), all_scores, groups, np.array([f for _, f, _ in rows])),
        "n_images": len(rows),
        "seconds": round(seconds, 1),
        "machine": machine(),  # networks' digits depend on the CPU's kernels (docs/results.md)
        "command": command,
    }
    run.write_summary(summary)
    result(f"\n{exp.name} on {summary['dataset']['name']} ({run.path})")
    result(f"{'fold':>6} {'images':>7} {'ARI':>8}")
    for f, (n, m) in enumerate(zip(fold_n, fold_means)):
        result(f"{f:>6} {n:>7} {m:>8.4f}")
    pg = summary["per_group"]
    result(f"{'mean':>6} {len(rows):>7} {mean:>8.4f}  (image std {std:.4f}, fold std {np.std(fold_means):.4f}, "
          f"{len(pg['groups'])} {pg['by']}s: min {min(g['ari'] for g in pg['groups']):.4f}, standard error {pg['se']:.4f})")  # fmt: skip
    return CVResult(run.path, mean, std, fold_means)
