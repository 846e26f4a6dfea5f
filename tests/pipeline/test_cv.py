"""The CV harness: deterministic folds, group discipline, run folders, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from comp.data.dataset import Dataset
from comp.methods.baselines import OfficialWatershedParams, SmoothWatershedParams
from comp.pipeline.config import CVConfig, Experiment
from comp.pipeline.cv import make_folds, run_cv
from tests.conftest import run_cli


def test_folds_deterministic_and_balanced() -> None:
    a, b = make_folds(23, 5, seed=1), make_folds(23, 5, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, make_folds(23, 5, seed=2))
    assert sorted(np.bincount(a)) == [4, 4, 5, 5, 5]


def test_groups_never_straddle_folds() -> None:
    groups = np.repeat(["v1", "v2", "v3", "v4", "v5", "v6"], [10, 3, 7, 7, 2, 5])
    folds = make_folds(len(groups), 3, seed=0, groups=groups)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 3


def _exp(name: str, method: str, params) -> Experiment:
    return Experiment(name=name, method=method, params=params, cv=CVConfig(folds=2, seed=0))


@pytest.mark.slow
def test_run_writes_a_complete_run_folder(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = _exp("official", "official_watershed", OfficialWatershedParams(workers=2))
    res = run_cv(exp, Dataset(tiny_phantom), runs=tmp_path)
    run = res.run_dir
    for name in ("config.yaml", "folds.csv", "oof_scores.csv", "cv.json"):
        assert (run / name).is_file()
    cv = json.loads((run / "cv.json").read_text())
    oof = pd.read_csv(run / "oof_scores.csv")
    assert len(oof) == 8 and set(oof["fold"]) == {0, 1}
    assert cv["mean_ari"] == pytest.approx(oof["ari"].mean())
    assert -1 <= cv["mean_ari"] <= 1 and cv["dataset"]["n_annotated"] == 8
    folds = pd.read_csv(run / "folds.csv")
    assert list(folds["index"]) == list(range(8))


@pytest.mark.slow
def test_resume_skips_finished_folds(tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = _exp("smooth", "smooth_watershed", SmoothWatershedParams(fit_images=2, fit_marker_thresholds=[0.01], fit_merge_deltas=[0.0], workers=1))
    first = run_cv(exp, Dataset(tiny_phantom), runs=tmp_path)
    # Simulate a kill after fold 0: no summary, fold 1 missing.
    (first.run_dir / "cv.json").unlink()
    (first.run_dir / "oof" / "fold1.npz").unlink()
    fold0 = (first.run_dir / "oof" / "fold0.npz").stat().st_mtime_ns
    second = run_cv(exp, Dataset(tiny_phantom), runs=tmp_path)
    assert second.run_dir == first.run_dir
    assert (first.run_dir / "oof" / "fold0.npz").stat().st_mtime_ns == fold0
    assert "fold 0: already done" in capsys.readouterr().out
    assert second.mean == pytest.approx(first.mean)
    fitted = json.loads((first.run_dir / "fold1" / "fold.json").read_text())["fitted"]
    assert fitted == {"marker_threshold": 0.01, "merge_delta": 0.0}
    # A finished run is not reused: a rerun gets a new run id.
    third = run_cv(exp, Dataset(tiny_phantom), runs=tmp_path)
    assert third.run_dir != first.run_dir


@pytest.mark.slow
def test_smooth_watershed_beats_the_official_baseline(tiny_phantom: Path, tmp_path: Path) -> None:
    d = Dataset(tiny_phantom)
    off = run_cv(_exp("off", "official_watershed", OfficialWatershedParams(workers=2)), d, runs=tmp_path)
    smooth = run_cv(_exp("sm", "smooth_watershed", SmoothWatershedParams(fit_images=4, workers=2)), d, runs=tmp_path)
    assert smooth.mean > off.mean


@pytest.mark.slow
def test_a_run_in_progress_is_not_run_twice(tmp_path, tiny_phantom):
    """A live holder of the run's lock stops a second process with one clear error; a dead one's lock is taken over."""
    import os
    import socket

    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_key
    from comp.data.dataset import Dataset
    from comp.pipeline.workspace import RunDir

    exp = load_experiment("baseline_watershed")
    lock = RunDir.lock_file(tmp_path / "runs", exp.name, run_key(exp, Dataset(tiny_phantom), 2))
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getpid()}@{socket.gethostname()}")  # this test process: alive
    args = ("cv", "baseline_watershed", "--data", str(tiny_phantom), "--folds", "2", "--runs", str(tmp_path / "runs"))
    r = run_cli(*args, env={"COMP_LOCK_WAIT": "1"})
    assert r.returncode == 2 and f"locked by process {os.getpid()}@" in r.stderr and "fold 0" not in r.stdout
    lock.write_text(f"{2**22 + 12345}@{socket.gethostname()}")  # no such process
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert not lock.exists() and len(list((tmp_path / "runs" / exp.name).glob("*/cv.json"))) == 1


@pytest.mark.slow
def test_folds_claimed_elsewhere_are_skipped_and_the_last_fold_summarises(tmp_path, tiny_phantom):
    """--fold K trains one fold; a fold held by a live process is left to it; a claim nobody touches any more is taken over."""
    import json
    import os
    import socket
    import time

    from comp.pipeline.workspace import RunDir

    runs = tmp_path / "runs"
    args = ("cv", "baseline_watershed", "--data", str(tiny_phantom), "--folds", "3", "--runs", str(runs))
    r = run_cli(*args, "--fold", "1")
    assert r.returncode == 0, r.stderr
    assert "fold 1: ARI" in r.stdout and "fold 0: ARI" not in r.stdout and "folds [0, 2] not done here" in r.stdout
    run = RunDir(next((runs / "baseline_watershed").iterdir()))
    assert run.fold_done(1) and not run.finished and not run.claim_file(1).exists()
    run.claim_file(0).parent.mkdir(parents=True, exist_ok=True)
    run.claim_file(0).write_text(f"{os.getpid()}@{socket.gethostname()}")  # alive: fold 0 is someone else's
    r = run_cli(*args)
    assert "fold 0: in progress in process" in r.stdout and "fold 2: ARI" in r.stdout and "fold 1: already done" in r.stdout
    assert not run.finished
    run.claim_file(0).write_text("1@another-machine")
    old = time.time() - 3600
    os.utime(run.claim_file(0), (old, old))  # its holder stopped beating an hour ago
    r = run_cli(*args)
    assert r.returncode == 0 and "fold 0: ARI" in r.stdout and run.finished, r.stdout + r.stderr
    assert run_cli(*args[:-1], str(tmp_path / "one")).returncode == 0  # the same run in one process
    one = RunDir(next((tmp_path / "one" / "baseline_watershed").iterdir()))
    assert json.loads(one.summary_file.read_text())["mean_ari"] == run.summary()["mean_ari"]
    r = run_cli(*args, "--fold", "3")
    assert r.returncode == 2 and "fold 3 of a 3-fold run" in r.stderr


def test_inner_split_holds_out_whole_groups() -> None:
    from comp.methods.base import inner_split

    groups = np.repeat(np.array(["v0", "v1", "v2", "v3"]), [10, 12, 9, 11])
    fit, val = inner_split(len(groups), 10, seed=3, groups=groups)
    assert len(val) >= 10 and not set(groups[fit]) & set(groups[val]) and set(groups[fit])
    assert sorted(np.concatenate([fit, val])) == list(range(len(groups)))
    fit, val = inner_split(len(groups), 10, seed=3)
    assert len(val) == 10 and set(groups[fit]) & set(groups[val])  # without groups: images at random


def test_an_empty_claim_does_not_block_its_fold(tmp_path, tiny_phantom):
    """A claim is written whole (temp file, hard link): an empty one is junk, taken over at once, not after 10 minutes."""
    from comp.core.claims import claim

    path = tmp_path / "fold0" / ".claim"
    path.parent.mkdir()
    path.write_text("")
    with claim(path) as holder:
        assert holder is None and path.read_text().count("@") == 1
    assert not path.exists() and not list(path.parent.iterdir())  # no temp left beside it


def test_fit_seed_moves_the_fitting_seeds_not_the_folds(tiny_phantom: Path, tmp_path: Path, monkeypatch) -> None:
    import comp.pipeline.cv as cv

    seeds: dict[int, list[int]] = {}
    folds = {}
    for fs in (0, 1):
        monkeypatch.setattr(cv, "_fit_fold", lambda method, ctx, *a, fs=fs, **k: seeds.setdefault(fs, []).append(ctx.seed))
        exp = _exp("official", "official_watershed", OfficialWatershedParams(workers=1))
        exp.cv.fit_seed = fs
        assert run_cv(exp, Dataset(tiny_phantom), runs=tmp_path) is None  # no fold was fitted: nothing to summarise
        (run,) = [p for p in (tmp_path / "official").iterdir() if exp.digest() in p.name]
        folds[fs] = pd.read_csv(run / "folds.csv")
    assert seeds[0] == [0, 1] and len(set(seeds[0]) | set(seeds[1])) == 4
    assert folds[0].equals(folds[1])
    base = _exp("x", "official_watershed", OfficialWatershedParams())
    moved = _exp("x", "official_watershed", OfficialWatershedParams())
    moved.cv.fit_seed = 2
    assert "fit_seed" not in base.to_dict()["cv"] and base.digest() != moved.digest()
