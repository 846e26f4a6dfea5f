"""make submit: predict X_test, write the CSV atomically, validate it; validation catches bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from comp.core.errors import UserError
from comp.data.dataset import Dataset
from comp.data.labels import read_label_csv, write_label_csv
from comp.methods.baselines import SmoothWatershedParams
from comp.pipeline.config import CVConfig, Experiment
from comp.pipeline.submit import submit, validate_submission
from tests.conftest import run_cli


@pytest.mark.slow
def test_submit_end_to_end(tiny_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = Experiment("sm", "smooth_watershed", SmoothWatershedParams(fit_images=2, workers=2), CVConfig())
    out = tmp_path / "submissions" / "sm.csv"
    s = submit(exp, Dataset(tiny_phantom), out)
    table = read_label_csv(out)
    from comp.core.metric import image_scores

    assert s["images"] == 4 and s["test_ari"] == pytest.approx(image_scores(Dataset(tiny_phantom).y_test, table.maps).mean())
    assert table.columns == [f"{i}.png" for i in range(4)] and table.maps.dtype == np.uint8
    head = pd.read_csv(out, nrows=2, index_col=0)
    assert list(head.index) == ["Pixel 0", "Pixel 1"]


@pytest.mark.slow
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
    with pytest.raises(UserError, match=r"no row labelled 'Pixel 0' \(row 1 is 'p0'\)"):
        validate_submission(relabelled, tiny_phantom)


@pytest.mark.slow
def test_cli_validate_and_score(tiny_phantom: Path, tmp_path: Path) -> None:
    sub = tmp_path / "sub.csv"
    shutil.copy(tiny_phantom / "Y_test.csv", sub)
    r = run_cli("validate-submission", str(sub), "--data", str(tiny_phantom))
    assert r.returncode == 0 and "valid submission for 4 test images" in r.stdout
    r = run_cli("score", str(tiny_phantom / "Y_test.csv"), str(sub))
    assert r.returncode == 0 and "score (mean over 4 images): 1.00000" in r.stdout
    r = run_cli("validate-submission", str(tmp_path / "none.csv"), "--data", str(tiny_phantom))
    assert r.returncode == 2 and "none.csv: file not found" in r.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


def _swap_test_slices(root: Path) -> None:
    """Swap X_test/0.png and X_test/1.png, as an update of the test set could."""
    a, b, tmp = root / "X_test" / "0.png", root / "X_test" / "1.png", root / "X_test" / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)


def test_kept_test_predictions_follow_the_test_slices(tiny_phantom: Path, tmp_path: Path) -> None:
    """Test predictions kept beside a fit are keyed on the test slices' pixels: swapped slices are predicted anew."""
    from comp.pipeline.submit import predict_test

    root = tmp_path / "data"
    shutil.copytree(tiny_phantom, root)
    exp = Experiment("sw", "smooth_watershed", SmoothWatershedParams(fit_images=0, workers=1), CVConfig())
    first = predict_test(exp, Dataset(root), runs=tmp_path / "runs")
    _swap_test_slices(root)
    again = predict_test(exp, Dataset(root), runs=tmp_path / "runs")
    assert not np.array_equal(first[0], first[1])
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[1], first[0])  # not the stale, misaligned ones


@pytest.mark.slow
def test_cached_test_maps_of_other_test_slices_are_refused(tiny_phantom: Path, tmp_path: Path) -> None:
    """`--cached` test maps predicted from other test slices (changed after CV) are refused, never blended in."""
    from comp.pipeline.cv import run_cv
    from comp.pipeline.config import load_experiment
    from comp.pipeline.ensemble import EnsembleSpec, MemberRef, save_ensemble
    from comp.core.store import save_maps
    from comp.pipeline.workspace import RunDir
    from comp.pipeline.submit import submit_ensemble
    from tests.conftest import fake_run

    root = tmp_path / "data"
    shutil.copytree(tiny_phantom, root)
    run = fake_run(tmp_path / "runs", root, "m")
    for f in range(2):
        save_maps(RunDir(run).test_maps_file(f), np.zeros((4, 7, 64, 64), np.float32))
    save_ensemble(EnsembleSpec(name="e", members=[MemberRef(str(run), 1.0)], data=Dataset(root).fingerprint()), tmp_path / "runs")
    assert submit_ensemble("e", Dataset(root), tmp_path / "ok.csv", tmp_path / "runs", cached=True, workers=1)["images"] == 4
    kept = RunDir(run).test_maps_file(1).read_bytes()
    RunDir(run).test_maps_file(1).unlink()  # a user cleaning up disk: not "the CV run had no X_test"
    with pytest.raises(UserError, match="cached test maps missing \\(deleted\\?\\); drop --cached"):
        submit_ensemble("e", Dataset(root), tmp_path / "gone.csv", tmp_path / "runs", cached=True, workers=1)
    RunDir(run).test_maps_file(1).write_bytes(kept)
    _swap_test_slices(root)
    with pytest.raises(UserError, match="predicted from other test slices"):
        submit_ensemble("e", Dataset(root), tmp_path / "stale.csv", tmp_path / "runs", cached=True, workers=1)
    assert not (tmp_path / "stale.csv").exists()
    # A CV run resumed after the test slices changed would cache two test sets' maps: refused too.
    exp = load_experiment("baseline_watershed_stretched")
    unfinished = RunDir(run_cv(exp, Dataset(root), 2, tmp_path / "r2").run_dir)
    unfinished.summary_file.unlink()
    (unfinished.path / "oof" / "fold1.npz").unlink()  # fold 1 still to do
    _swap_test_slices(root)
    with pytest.raises(UserError, match="test slices changed since this run began"):
        run_cv(exp, Dataset(root), 2, tmp_path / "r2")


@pytest.mark.slow
def test_score_and_validate_align_rows_by_label_and_pair_images_by_position(tiny_phantom: Path, tmp_path: Path) -> None:
    """As the official scorer: pixel rows matched by label (reordered rows score the same), images by column position."""
    truth = read_label_csv(tiny_phantom / "Y_test.csv")
    rows = tmp_path / "reversed.csv"
    labels = [f"Pixel {i}" for i in range(512 * 512)][::-1]
    write_label_csv(rows, truth.maps.reshape(4, -1)[:, ::-1].reshape(4, 512, 512), truth.columns, labels)
    r = run_cli("score", str(tiny_phantom / "Y_test.csv"), str(rows))
    assert r.returncode == 0 and "score (mean over 4 images): 1.00000" in r.stdout, r.stdout + r.stderr
    r = run_cli("validate-submission", str(rows), "--data", str(tiny_phantom))
    assert r.returncode == 0 and "matched by label" in r.stdout
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(tiny_phantom / "Y_test.csv", index_col=0)[["1.png", "0.png", "2.png", "3.png"]].to_csv(shuffled)
    for cmd in (("score", str(tiny_phantom / "Y_test.csv"), str(shuffled)), ("validate-submission", str(shuffled), "--data", str(tiny_phantom))):
        r = run_cli(*cmd)
        assert r.returncode == 2 and "column 1 is '1.png', not '0.png'" in r.stderr and "Traceback" not in r.stderr


def test_an_empty_ensemble_file_is_one_clear_error(tiny_phantom: Path, tmp_path: Path) -> None:
    (tmp_path / "ensembles").mkdir()
    (tmp_path / "ensembles" / "e.yaml").write_text("")
    (tmp_path / "ensembles" / "m.yaml").write_text("name: m\nmembers: []\n")
    for name, message in (("e", "empty, or not a mapping"), ("m", "names no member run")):
        r = run_cli("submit", "--ensemble", name, "--data", str(tiny_phantom), "--runs", str(tmp_path), "--out", str(tmp_path / "s.csv"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
