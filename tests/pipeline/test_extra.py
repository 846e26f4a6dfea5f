"""`cv --extra`: annotated slices of other data sets join every training part, in the main data's grey levels, never scored."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import run_cli


@dataclass
class _RecorderParams:
    """No parameters."""


def _register_recorder() -> None:
    """A method that keeps what each fit was given (ids and slices) and predicts one region per slice."""
    from comp.methods.registry import get_method, register_method

    get_method("smooth_watershed")  # the real providers first: registration order does not matter

    @register_method("test_recorder", _RecorderParams)
    class Recorder:
        def __init__(self, params) -> None:
            self.p = params

        def fit(self, train, ctx) -> None:
            np.savez(ctx.workdir / "seen.npz", ids=train.ids, x=train.x, groups=np.array([] if train.groups is None else train.groups))

        def predict(self, x: np.ndarray) -> np.ndarray:
            return np.ones((len(x), 512, 512), np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A main set (one window), an extra set rendered 2x wider (-2000..2000 HU) and the same extra slices at -1000..1000."""
    from comp.data.phantom import generate

    root = tmp_path_factory.mktemp("extra")
    main = generate(root / "main", n_train=8, n_labelled=6, n_test=1, seed=7, workers=2)
    wide = generate(root / "wide", n_train=5, n_labelled=4, n_test=1, seed=8, workers=2, window_per_slice=(-2000, -2000, 2000, 2000))
    usual = generate(root / "usual", n_train=5, n_labelled=4, n_test=1, seed=8, workers=2)
    return main, wide, usual, root


@pytest.mark.slow
def test_extra_slices_train_every_fold_in_the_main_grey_levels_and_are_never_scored(sets, tmp_path):
    from comp.pipeline.config import experiment_from_dict
    from comp.pipeline.cv import run_cv
    from comp.data.dataset import Dataset

    _register_recorder()
    main, wide, usual, _ = sets
    raw = {"name": "rec", "method": "test_recorder", "cv": {"folds": 2, "extra": [str(wide)]}}
    exp = experiment_from_dict(raw, tmp_path / "rec.yaml")
    res = run_cv(exp, Dataset(main), runs=tmp_path / "runs")
    data = Dataset(main)
    with open(res.run_dir / "oof_scores.csv") as fh:
        scored = [r["image"] for r in csv.DictReader(fh)]
    assert sorted(scored) == sorted(f"{i}.png" for i in data.annotated)  # the 6 main slices only
    want = Dataset(usual)
    for f in range(2):
        with np.load(res.run_dir / f"fold{f}" / "seen.npz") as z:
            ids, x = z["ids"], z["x"]
        assert (ids < 0).sum() == 4 and (ids >= 0).sum() == 3  # every extra slice, and the main training part
        # Re-rendered from their own 2x wider window into the main data's: within rounding of the usual rendering.
        body = want.x_train[want.annotated] > 40
        assert np.abs(x[ids < 0].astype(int) - want.x_train[want.annotated])[body].mean() < 1.5
    plain = experiment_from_dict({**raw, "cv": {"folds": 2}}, tmp_path / "rec.yaml")
    assert run_cv(plain, Dataset(main), runs=tmp_path / "runs").run_dir != res.run_dir  # extra data is part of the run key


@pytest.mark.slow
def test_a_bad_extra_folder_is_one_clear_error_and_writes_nothing(sets, tmp_path):
    """A missing folder (the command line: one line, exit 2), the cross-validated data itself, a folder named twice
    and one without annotations: refused before any run folder is written."""
    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.data.phantom import generate
    from comp.core.errors import UserError
    from comp.data.dataset import Dataset

    main, wide, _, root = sets
    runs = tmp_path / "runs"
    r = run_cli("cv", "smooth_watershed", "--data", str(main), "--folds", "2", "--extra", str(root / "nope"), "--runs", str(runs))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr, r.stderr
    bare = generate(tmp_path / "bare", n_train=3, n_labelled=0, n_test=1, seed=9, workers=1)
    for extra, why in (([str(main)], "being cross-validated"), ([str(wide), str(wide)], "named twice"), ([str(bare)], "no annotated slice")):
        exp = load_experiment("smooth_watershed", [f"cv.extra={json.dumps(extra)}"])
        with pytest.raises(UserError, match=why):
            run_cv(exp, Dataset(main), 2, runs)
    assert not any(p.is_dir() for p in runs.glob("*/*")), list(runs.rglob("*"))
