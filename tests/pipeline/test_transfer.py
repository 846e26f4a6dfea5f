"""Transfer: fitted on every annotated slice of one data set, scored on another's, each behind its own contrast step."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 6 annotated slices rendered at -1000..1000 HU and at -2000..2000 HU, and an unrelated fitting set."""
    from comp.data.phantom import generate

    root = tmp_path_factory.mktemp("transfer")
    fit = generate(root / "fit", n_train=8, n_labelled=6, n_test=1, seed=5, workers=2)
    same = generate(root / "same", n_train=6, n_labelled=6, n_test=1, seed=6, workers=2)
    wide = generate(root / "wide", n_train=6, n_labelled=6, n_test=1, seed=6, workers=2, window_per_slice=(-2000, -2000, 2000, 2000))
    return fit, same, wide, root / "runs"


@pytest.mark.slow
def test_the_scored_data_is_read_through_its_own_contrast_step(pair):
    """A window 2x wider on the scored slices: re-resolved there, the stretched baseline scores as on the usual rendering;
    with the fitting data's grey window it would not."""
    from comp.pipeline.config import load_experiment
    from comp.data.dataset import Dataset
    from comp.core.metric import image_scores
    from comp.pipeline.submit import fit_every_annotated
    from comp.pipeline.transfer import transfer

    fit, same, wide, runs = pair
    exp = load_experiment("baseline_watershed_stretched")
    r_same, r_wide = transfer(exp, Dataset(fit), [Dataset(same), Dataset(wide)], runs=runs)
    assert r_same.n_images == r_wide.n_images == 6
    assert abs(r_wide.mean_ari - r_same.mean_ari) < 0.05, (r_same, r_wide)
    stale = fit_every_annotated(exp, Dataset(fit), runs=runs)  # the fitting data's grey window, applied as it is
    w = Dataset(wide)
    stale_ari = image_scores(w.y_train[w.annotated], stale.predict(w.x_train[w.annotated])).mean()
    assert r_wide.mean_ari > stale_ari + 0.05, (r_wide.mean_ari, stale_ari)


@pytest.mark.slow
def test_a_kept_record_is_reused_only_for_the_same_scored_pixels(pair, capsys):
    """Run twice: the second reads the record; scored slices changed in place: scored again."""
    from comp.pipeline.config import load_experiment
    from comp.data.dataset import Dataset
    from comp.pipeline.transfer import transfer

    fit, same, _, runs = pair
    exp = load_experiment("smooth_watershed")
    first = transfer(exp, Dataset(fit), [Dataset(same)], runs=runs)[0]
    record = json.loads(open(first.path).read())
    assert len(record["images"]) == 6 and record["score_data"]["name"] == "same"
    capsys.readouterr()
    again = transfer(exp, Dataset(fit), [Dataset(same)], runs=runs)[0]
    assert "kept in" in capsys.readouterr().out and again == first
    from comp.report.leaderboard import write_leaderboard

    board = write_leaderboard(runs).read_text()
    assert "## transfer" in board and f"| fit | same | smooth_watershed | {first.mean_ari:.4f} ± {first.std_ari:.4f} | 6 |" in board
    d = Dataset(same)
    x = d.x_train.copy()
    x[d.annotated[0]] = np.roll(x[d.annotated[0]], 40, axis=1)
    d.__dict__["x_train"] = x  # the same labels file, other pixels
    transfer(exp, Dataset(fit), [d], runs=runs)
    assert "fitting on every annotated slice" in capsys.readouterr().out


@pytest.mark.slow
def test_transfer_cli_refuses_scoring_the_fitting_data(pair):
    """`--score` naming the `--fit` folder is one clear line and exit 2."""
    fit, _, _, runs = pair
    r = run_cli("transfer", "smooth_watershed", "--fit", str(fit), "--score", str(fit), "--runs", str(runs))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "data the experiment is fitted on" in r.stderr, r.stderr


@pytest.mark.slow
def test_transfer_reads_no_label_of_the_scored_data_before_it_has_predicted_it(pair, tmp_path):
    """The scored data's labels are read only after its slices were predicted (which slices are scored aside)."""
    from comp.pipeline.config import load_experiment
    from comp.data.dataset import Dataset
    from comp.pipeline.submit import fit_every_annotated
    from comp.pipeline.transfer import transfer

    fit, same, _, _ = pair
    exp = load_experiment("smooth_watershed")
    real = Dataset(same)
    events = []

    class Guarded(Dataset):
        annotated = real.annotated

        @property
        def y_train(self):
            events.append("labels")
            return real.y_train

    method = fit_every_annotated(exp, Dataset(fit), runs=tmp_path)
    predict = method.predict
    method.predict = lambda x: (events.append("predict"), predict(x))[1]
    import comp.pipeline.transfer

    orig, comp.pipeline.transfer.fit_every_annotated = comp.pipeline.transfer.fit_every_annotated, lambda *a, **k: method
    try:
        r = transfer(exp, Dataset(fit), [Guarded(same)], runs=tmp_path)[0]
    finally:
        comp.pipeline.transfer.fit_every_annotated = orig
    assert events[0] == "predict" and "labels" in events, events
    assert r.n_images == len(real.annotated)


@pytest.mark.slow
def test_an_ensemble_transfers_as_it_was_selected_on_the_fitting_data(pair, tmp_path, capsys):
    """A one-member ensemble of a tiny network: scored on the same slices in two renderings alike, its record kept;
    an ensemble selected on other data, or scored on its own data, is refused."""
    import yaml

    from comp.pipeline.config import experiment_from_dict
    from comp.pipeline.cv import run_cv
    from comp.pipeline.ensemble import save_ensemble, single_member
    from comp.core.errors import UserError
    from comp.data.dataset import Dataset
    from comp.pipeline.transfer import transfer_ensemble
    from tests.conftest import TINY_UNET

    fit, same, wide, _ = pair
    runs = tmp_path / "runs"
    raw = yaml.safe_load(TINY_UNET)
    raw["params"]["train"]["epochs"] = 4
    run = run_cv(experiment_from_dict({**raw, "name": "tinytr"}, tmp_path / "tinytr.yaml"), Dataset(fit), runs=runs).run_dir
    save_ensemble(single_member("tinyens", run, data=Dataset(fit).fingerprint()), runs)
    r_same, r_wide = transfer_ensemble("tinyens", Dataset(fit), [Dataset(same), Dataset(wide)], runs)
    per_image = [[i["ari"] for i in json.loads(open(r.path).read())["images"]] for r in (r_same, r_wide)]
    assert r_same.n_images == 6 and max(per_image[0]) > 0.05, per_image  # the network predicts something
    assert np.abs(np.subtract(*per_image)).mean() < 0.05, per_image
    capsys.readouterr()
    assert transfer_ensemble("tinyens", Dataset(fit), [Dataset(same)], runs)[0] == r_same
    assert "kept in" in capsys.readouterr().out
    with pytest.raises(UserError, match="selected on other data"):
        transfer_ensemble("tinyens", Dataset(same), [Dataset(wide)], runs)
    with pytest.raises(UserError, match="fitted on"):
        transfer_ensemble("tinyens", Dataset(fit), [Dataset(fit)], runs)
    from comp.pipeline.transfer import transfer_fold_models

    rows = transfer_fold_models(run, Dataset(same))  # each fold model alone, then averaged as the ensemble is
    assert [r.fold for r in rows] == [0, 1, -1] and rows[-1].true_regions > 0
    assert abs(rows[-1].mean_ari - r_same.mean_ari) < 1e-6, (rows, r_same)
    assert len({round(r.mean_ari, 6) for r in rows[:2]}) > 1, rows  # two fits, two scores


def test_a_fit_on_every_annotated_slice_takes_the_config_s_fit_seed(pair, monkeypatch):
    """`--set cv.fit_seed=1` moves the fit behind `transfer` and `submit` as it moves CV's folds (it used to be ignored)."""
    from comp.data.dataset import Dataset
    from comp.methods.baselines import SmoothWatershed
    from comp.pipeline.config import load_experiment
    from comp.pipeline.submit import fit_every_annotated

    fit, _, _, runs = pair
    seeds = []
    monkeypatch.setattr(SmoothWatershed, "fit", lambda self, train, ctx: seeds.append(ctx.seed))
    for overrides in ([], ["cv.fit_seed=1"], ["cv.seed=3", "cv.fit_seed=2"]):
        fit_every_annotated(load_experiment("smooth_watershed", overrides), Dataset(fit), runs=runs)
    fit_every_annotated(load_experiment("smooth_watershed", ["cv.fit_seed=1"]), Dataset(fit), seed=7, runs=runs)
    assert seeds == [0, 1000, 2003, 7]
