"""The contrast step: the shared HU mapping, histogram landmarks, `auto`, and one behaviour in cv, tune and submit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from comp.core.errors import UserError
from comp.data.calibration import histogram, landmarks
from comp.data.contrast import Contrast, ContrastParams, hu_to_grey, resolve
from comp.pipeline.workspace import RunDir
from tests.conftest import run_cli


def test_shared_mapping_at_its_landmarks():
    grey = hu_to_grey(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0]))
    assert grey.dtype == np.uint8
    assert grey[0] == 0 and grey[1] == 0 and grey[3] == 255 and grey[4] == 255
    assert grey[2] in (127, 128)
    assert list(hu_to_grey(np.array([-350.0, 450.0]), -350, 450)) == [0, 255]


@pytest.mark.parametrize("window", [(-1000.0, 1000.0), (-500.0, 700.0)])
def test_auto_recovers_the_window_of_synthetic_slices(window):
    from comp.data.phantom import render_slice

    x = np.stack([render_slice(seed, window=window)[0] for seed in range(8)])
    lo, hi = landmarks(histogram(x)).window()
    width = window[1] - window[0]
    assert abs(lo - window[0]) < 0.05 * width and abs(hi - window[1]) < 0.05 * width
    c = resolve(ContrastParams(window="auto", hu=[-350, 450]), x)
    # The soft-tissue window's grey levels, as the true mapping puts them.
    want = [(v - window[0]) / width * 255 for v in (-350, 450)]
    assert abs(c.window[0] - want[0]) < 0.05 * 255 and abs(c.window[1] - want[1]) < 0.05 * 255


def test_stretch_is_the_window_lookup_and_none_is_identity():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert Contrast().stretch(x) is x
    s = Contrast((100.0, 150.0)).stretch(x)
    assert s[0, 0] == 0 and s.ravel()[100] == 0 and s.ravel()[150] == 255 and s.ravel()[125] in (127, 128)
    a, b = Contrast((100.0, 150.0)).unit_affine()
    assert a * 100 / 255 + b == pytest.approx(0) and a * 150 / 255 + b == pytest.approx(1)
    assert Contrast((100.0, 150.0), ((50.0, 250.0),)).stem_windows() == ((0.0, 1.0), (-1.0, 3.0))


@pytest.mark.parametrize("bad", [[150, 100], [1, 2, 3], "wide", [None, 3]])
def test_bad_window_is_a_user_error(bad):
    x = np.zeros((1, 8, 8), np.uint8)
    with pytest.raises(UserError, match="contrast.window"):
        resolve(ContrastParams(window=bad), x, "exp.yaml")


def _official(tmp_path: Path, window) -> Path:
    """The official baseline behind a fixed window, as an experiment file."""
    path = tmp_path / f"ow_{window[0]}.yaml"
    path.write_text(yaml.safe_dump({"name": f"ow_{window[0]}", "method": "official_watershed", "params": {"workers": 1},
                                    "contrast": {"window": list(window)}, "cv": {"folds": 2}}))  # fmt: skip
    return path


@pytest.mark.slow
def test_a_window_acts_identically_in_cv_tune_and_submit(tmp_path, tiny_phantom):
    from comp.methods.baselines import OfficialWatershedParams, official_watershed
    from comp.pipeline.config import load_experiment
    from comp.pipeline.oof import oof_index, run_experiment
    from comp.data.dataset import Dataset
    from comp.data.labels import read_label_csv
    from comp.pipeline.tune_method import method_scores

    data = Dataset(tiny_phantom)
    direct = {}
    for window in ((100, 160), (60, 200)):
        exp_path = _official(tmp_path, window)
        r = run_cli("cv", str(exp_path), "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs"))
        assert r.returncode == 0, r.stderr
        run = next((tmp_path / "runs" / f"ow_{window[0]}").iterdir())
        stretched = Contrast(tuple(map(float, window))).stretch
        ref = lambda x: np.stack([official_watershed(s, OfficialWatershedParams()) for s in stretched(x)])  # noqa: E731
        # cv: the out-of-fold predictions are the baseline on the stretched slices.
        ids, _ = oof_index(run)
        pred = np.concatenate([np.load(run / "oof" / f"fold{f}.npz")["pred"] for f in range(2)])
        assert np.array_equal(pred, ref(data.x_train[ids]))
        # tune: a trial with the run's settings scores exactly the CV's per-image scores.
        exp, contrast = run_experiment(run)
        assert contrast.window == tuple(map(float, window))
        cv_scores = np.concatenate([np.load(run / "oof" / f"fold{f}.npz")["scores"] for f in range(2)])
        assert np.allclose(method_scores(exp, contrast, data.x_train[ids], data.y_train[ids]), cv_scores)
        # submit: the test predictions are the same function of the test slices.
        out = tmp_path / f"sub_{window[0]}.csv"
        r = run_cli("submit", str(exp_path), "--data", str(tiny_phantom), "--out", str(out))
        assert r.returncode == 0, r.stderr
        direct[window] = read_label_csv(out).maps
        assert np.array_equal(direct[window], ref(data.x_test))
        assert load_experiment(str(exp_path)).contrast.window == list(window)
    assert not np.array_equal(direct[(100, 160)], direct[(60, 200)])  # the setting matters


@pytest.mark.slow
def test_tuned_window_of_a_non_learned_run_is_what_submit_uses(tmp_path, tiny_phantom):
    from comp.methods.baselines import OfficialWatershedParams, official_watershed
    from comp.pipeline.ensemble import load_ensemble, single_member
    from comp.data.dataset import Dataset
    from comp.data.labels import read_label_csv
    from comp.pipeline.tune_method import tune_method

    runs = tmp_path / "runs"
    exp_path = _official(tmp_path, (0, 255))
    assert run_cli("cv", str(exp_path), "--data", str(tiny_phantom), "--runs", str(runs)).returncode == 0
    # `make tune` with no map-predicting run: the Makefile's EXP is tuned into the 'default' file.
    r = run_cli("tune", "default", "--exp", "ow_0", "--trials", "3", "--data", str(tiny_phantom), "--runs", str(runs))
    assert r.returncode == 0, r.stderr
    assert "method parameters and contrast window" in r.stdout and "to beat: the run's own CV ARI" in r.stdout
    data = Dataset(tiny_phantom)
    spec = single_member("forced", next((runs / "ow_0").iterdir()), data=data.fingerprint())
    spec.oof_ari = -1.0  # any trial beats it: the best one is stored
    res = tune_method(spec, data, runs, trials=4)
    assert res.stored
    stored = load_ensemble("forced", runs)
    window = stored.overrides["contrast.window"]
    assert stored.oof_ari == pytest.approx(res.oof_ari) and len(window) == 2 and window[0] < window[1]
    out = tmp_path / "forced.csv"
    r = run_cli("submit", "--ensemble", "forced", "--data", str(tiny_phantom), "--runs", str(runs), "--out", str(out))
    assert r.returncode == 0, r.stderr
    p = OfficialWatershedParams(**{k.split(".")[1]: v for k, v in stored.overrides.items() if k.startswith("params.")})
    want = np.stack([official_watershed(s, p) for s in Contrast(tuple(window)).stretch(data.x_test)])
    assert np.array_equal(read_label_csv(out).maps, want)


@pytest.mark.slow
def test_networks_get_window_channels_and_reload_them(tmp_path, tiny_phantom):
    """A learned run with `auto` and an extra channel: the fold models reloaded for submit give the cached maps."""
    import torch

    from comp.data.dataset import Dataset
    from comp.pipeline.submit import member_test_maps
    from tests.conftest import TINY_UNET

    raw = yaml.safe_load(TINY_UNET)
    raw.update(name="tiny_windows", contrast={"window": "auto", "channels": [[-1000, 1000]]})
    exp_path = tmp_path / "tiny_windows.yaml"
    exp_path.write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    r = run_cli("cv", str(exp_path), "--data", str(tiny_phantom), "--runs", str(runs))
    assert r.returncode == 0, r.stderr
    run = next((runs / "tiny_windows").iterdir())
    resolved = yaml.safe_load((run / "config.yaml").read_text())["contrast_resolved"]
    assert len(resolved["channels"]) == 1 and 0 < resolved["window"][0] < resolved["window"][1] < 255
    ck = torch.load(run / "fold0" / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert ck["stem.windows"].shape == (2, 2)  # two input channels: the main window and the extra one
    cached = np.mean([RunDir(run).test_maps(f)[:] for f in range(2)], axis=0)
    again = member_test_maps(run, Dataset(tiny_phantom), cached=False, tta=False).astype(np.float32)
    assert np.allclose(again, cached, atol=2e-3)
