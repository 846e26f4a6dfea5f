"""make submit: predict X_test, write the CSV atomically, validate it; validation catches bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from comp.config import CVConfig, Experiment
from comp.baselines import SmoothWatershedParams
from comp.errors import UserError
from comp.io import Dataset, read_label_csv, write_label_csv
from comp.submit import submit, validate_submission
from tests.conftest import ROOT, run_cli


def test_submit_end_to_end(tiny_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = Experiment("sm", "smooth_watershed", SmoothWatershedParams(fit_images=2, workers=2), CVConfig())
    out = tmp_path / "submissions" / "sm.csv"
    s = submit(exp, Dataset(tiny_phantom), out)
    table = read_label_csv(out)
    from comp.metric import image_scores

    assert s["images"] == 4 and s["test_ari"] == pytest.approx(image_scores(Dataset(tiny_phantom).y_test, table.maps).mean())
    assert table.columns == [f"{i}.png" for i in range(4)] and table.maps.dtype == np.uint8
    head = pd.read_csv(out, nrows=2, index_col=0)
    assert list(head.index) == ["Pixel 0", "Pixel 1"]


def test_validate_catches_layout_errors(tiny_phantom: Path, tmp_path: Path) -> None:
    ok = tmp_path / "ok.csv"
    write_label_csv(ok, np.zeros((4, 512, 512), np.uint8))
    assert validate_submission(ok, tiny_phantom)["images"] == 4
    few = tmp_path / "few.csv"
    write_label_csv(few, np.zeros((3, 512, 512), np.uint8))
    with pytest.raises(UserError, match="missing column '3.png'"):
        validate_submission(few, tiny_phantom)
    many = tmp_path / "many.csv"
    write_label_csv(many, np.zeros((5, 512, 512), np.uint8))
    with pytest.raises(UserError, match="unexpected column '4.png'"):
        validate_submission(many, tiny_phantom)
    relabelled = tmp_path / "labels.csv"
    write_label_csv(relabelled, np.zeros((4, 512, 512), np.uint8), row_labels=[f"p{i}" for i in range(512 * 512)])
    with pytest.raises(UserError, match="row label 'p0' at row 1 does not match 'Pixel 0'"):
        validate_submission(relabelled, tiny_phantom)


def test_cli_validate_and_score(tiny_phantom: Path, tmp_path: Path) -> None:
    sub = tmp_path / "sub.csv"
    shutil.copy(tiny_phantom / "Y_test.csv", sub)
    r = run_cli("validate-submission", str(sub), "--data", str(tiny_phantom))
    assert r.returncode == 0 and "valid submission for 4 test images" in r.stdout
    r = run_cli("score", str(tiny_phantom / "Y_test.csv"), str(sub))
    assert r.returncode == 0 and "score (mean over 4 images): 1.00000" in r.stdout
    r = run_cli("validate-submission", str(tmp_path / "none.csv"), "--data", str(tiny_phantom))
    assert r.returncode == 2 and "none.csv: file not found" in r.stderr


def test_cli_cv_and_submit_on_a_data_folder(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "quick.yaml"
    exp.write_text(
        "method: smooth_watershed\nparams: {fit_images: 2, fit_marker_thresholds: [0.01], fit_merge_deltas: [0.0]}\n"
        "cv: {folds: 2}\n"
    )
    r = run_cli("cv", str(exp), "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout and "quick on" in r.stdout
    out = tmp_path / "quick.csv"
    r = run_cli("submit", str(exp), "--data", str(tiny_phantom), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held-out test ARI" in r.stdout and out.is_file()


def test_submit_on_other_data_never_resumes_the_first_datas_model(tmp_path):
    """The same learned config submitted on two data sets trains twice, each in its own --runs work folder."""
    import yaml

    from comp.data.phantom import generate
    from tests.conftest import TINY_UNET

    exp = tmp_path / "tinysub.yaml"
    raw = yaml.safe_load(TINY_UNET)
    raw["params"]["train"]["epochs"] = 1
    exp.write_text(yaml.safe_dump({**raw, "name": "tinysub"}))
    outs = []
    for seed in (11, 12):
        data = generate(tmp_path / f"d{seed}", n_train=6, n_labelled=4, n_test=2, seed=seed, workers=1)
        r = run_cli("submit", str(exp), "--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / f"{seed}.csv"))
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout + r.stderr)
    assert "resuming" not in outs[1]
    assert len(list((tmp_path / "runs" / "tinysub").glob("submit-*"))) == 2
