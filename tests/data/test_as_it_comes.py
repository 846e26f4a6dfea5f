"""The challenge data as it comes: a window per slice, scans hidden behind shuffled slices, coarse resolution."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from comp.core.errors import UserError
from comp.data.calibration import slice_calibration, survey
from comp.data.contrast import PER_SLICE_EXAMPLE, Contrast, ContrastParams, draw_windows, resolve
from comp.data.dataset import Dataset
from comp.data.images import image_names, write_images
from comp.data.labels import write_label_csv
from comp.data.phantom import render_slice
from tests.conftest import run_cli

DRAWN = draw_windows(PER_SLICE_EXAMPLE, 6, np.random.default_rng(11))


@pytest.fixture(scope="module")
def per_slice() -> np.ndarray:
    """Six phantom slices, each through its own window drawn from the documented ranges."""
    return np.stack([render_slice(40 + i, window=tuple(w))[0] for i, w in enumerate(DRAWN)])


def test_a_per_slice_windowed_phantom_is_calibrated_per_slice_within_2_percent(per_slice):
    for img, (lo, hi) in zip(per_slice, DRAWN):
        cal = slice_calibration(img)
        assert cal is not None
        got = np.array(cal.window())
        assert np.abs(got - (lo, hi)).max() < 0.02 * (hi - lo), (got, (lo, hi))
    c = resolve(ContrastParams(window="auto"), per_slice, "test", say=lambda _: None)
    assert c.per_slice is not None  # the survey saw windows that spread
    assert Contrast.from_dict(c.to_dict()) == c  # as a run's config stores it


def test_every_slice_reaches_the_methods_in_the_same_hu_units(per_slice):
    # One slice rendered through two very different windows reads the same once calibrated; the data set's
    # one-window step (no per-slice calibration) keeps them far apart.
    a = render_slice(40, window=(-3000.0, 1100.0))[0]
    b = render_slice(40, window=(-1100.0, 3000.0))[0]
    c = resolve(ContrastParams(window="auto"), per_slice, "test", say=lambda _: None)
    sa, sb = c.stretch(np.stack([a, b]))
    body = (sa > 0) & (sa < 255)
    assert np.abs(sa.astype(int) - sb)[body].mean() < 3.0
    assert np.abs(a.astype(int) - b).mean() > 20
    ca, cb = c.canonical(np.stack([a, b]))
    assert np.abs(ca.astype(int) - cb).mean() < 2.0


def test_a_slice_without_tissue_peaks_falls_back_with_a_count(per_slice):
    blank = np.full((1, 512, 512), 7, np.uint8)  # no air, fat or soft tissue: nothing to calibrate on
    x = np.concatenate([per_slice, blank])
    assert slice_calibration(blank[0]) is None
    sv = survey(x)
    assert sv.failed == 1 and sv.per_slice
    said = []
    c = resolve(ContrastParams(window="auto"), x, "test", say=said.append)
    assert "1 of 7 surveyed slices lack landmarks" in said[0]
    out = c.stretch(x)  # the blank slice takes the data set's calibration: no exception
    assert out.shape == x.shape


def test_one_window_data_keeps_the_data_sets_calibration():
    x = np.stack([render_slice(60 + i)[0] for i in range(4)])  # the challenge-like -1000..1000 for every slice
    assert not survey(x).per_slice
    assert resolve(ContrastParams(window="auto"), x, "test").per_slice is None


@pytest.mark.parametrize("ranges", [["-1000:-3100", "1000:3100"], ["-3100:-1000", "-2000:900"], ["-3100", "1000:3100"], ["a:b", "1:2"]])
def test_bad_window_per_slice_ranges_are_one_clear_error(tmp_path, ranges):
    r = run_cli("data", "phantom", "--out", str(tmp_path / "p"), "--n-train", "2", "--n-labelled", "1", "--n-test", "1",
                "--window-per-slice", *ranges)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "--window-per-slice" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists()


def test_phantom_command_without_workers_renders_on_the_cpu_share(tmp_path):
    r = run_cli("data", "phantom", "--out", str(tmp_path / "p"), "--n-train", "2", "--n-labelled", "1", "--n-test", "1")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "p" / "X_train").iterdir())) == 2 and (tmp_path / "p" / "Y_train.csv").is_file()


def _scan(n: int, a0: float, b0: float, pad: int, seed: int) -> np.ndarray:
    """A synthetic CT scan: an elliptic body that grows slowly along z, in a volume padded to 512x512 by `pad` rows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    out = []
    for z in range(n):
        a, b = a0 + 3 * z, b0 + 2 * z
        inside = ((xx - 256) / a) ** 2 + ((yy - 256) / b) ** 2 < 1
        fat = ((xx - 256) / (a - 12)) ** 2 + ((yy - 256) / (b - 12)) ** 2 >= 1
        hu = np.where(inside, np.where(fat, -100.0, 40.0), -1000.0) + rng.normal(0, 15, (512, 512))
        img = np.clip(np.rint((hu + 1000) / 2000 * 255), 0, 255).astype(np.uint8)
        img[:pad] = img[512 - pad :] = 0
        out.append(img)
    return np.stack(out)


def test_scans_are_inferred_from_a_tiny_shuffled_mix(tmp_path):
    from comp.data.groups import infer_scans

    scans = [_scan(8, 150, 100, 40, 1), _scan(6, 220, 150, 70, 2)]
    phantom = np.stack([render_slice(80 + i)[0] for i in range(4)])
    x = np.concatenate([*scans, phantom])
    truth = np.array([0] * 8 + [1] * 6 + [2, 3, 4, 5])
    perm = np.random.default_rng(0).permutation(len(x))
    got = infer_scans(x[perm])
    assert adjusted_rand_score(truth[perm], got.scan) == 1.0
    first = np.empty(len(x), int)
    first[perm] = got.position
    z = first[:8]
    assert abs(np.corrcoef(z, np.arange(8))[0, 1]) > 0.95  # ordered along the scan (either way up)


@pytest.mark.slow
def test_cv_uses_inferred_groups_without_a_groups_file(tmp_path):
    from comp.data.groups import fold_groups

    root = tmp_path / "data"
    x = np.concatenate([_scan(6, 150, 100, 40, 1), _scan(6, 220, 150, 70, 2)])
    y = np.zeros_like(x)
    y[:, 250:260, 250:260] = 1
    write_images(root / "X_train", x)
    write_label_csv(root / "Y_train.csv", y, image_names(len(x)))
    data = Dataset(root)
    said = []
    groups = fold_groups("auto", data, say=said.append)
    assert "inferred" in said[0]
    scans = np.array([g.split(":")[0] for g in groups])
    assert len(set(scans[:6])) == 1 and len(set(scans[6:])) == 1 and scans[0] != scans[6]
    assert fold_groups("none", data, say=said.append) is None
    with pytest.raises(UserError, match="groups.csv"):
        fold_groups("file", data, say=said.append)
    r = run_cli("data", "groups", str(root), "--write")
    assert r.returncode == 0, r.stderr
    assert "2 scans inferred from 12 slices" in r.stdout
    assert (Dataset(root).groups() == groups).all()  # the file now says what auto inferred
    again = run_cli("data", "groups", str(root), "--write")
    assert again.returncode == 2 and "--force" in again.stderr


def test_coarse_rendering_shows_in_the_measured_resolution():
    from comp.report.stats import correlation_length

    native = np.nanmedian([correlation_length(render_slice(90 + i)[0]) for i in range(3)])
    coarse = np.nanmedian([correlation_length(render_slice(90 + i, coarse=4.0)[0]) for i in range(3)])
    assert native < 1.5 and coarse > 2.0 * native


def test_a_coarser_grey_step_shows_as_posterized_flat_tissue():
    """Rounding a slice's grey levels to every 3rd (a window three times wider) makes flat tissue's neighbours equal
    more often; a smooth (coarse) slice is posterized more than a noisy native one at the same step."""
    from comp.report.stats import equal_neighbours

    native, coarse = render_slice(90)[0], render_slice(90, coarse=4.0)[0]
    assert equal_neighbours((native // 3) * 3) > equal_neighbours(native) + 0.1
    assert equal_neighbours((coarse // 3) * 3) > equal_neighbours(coarse) + 0.1
    assert equal_neighbours(coarse) > equal_neighbours(native) + 0.2
    assert np.isnan(equal_neighbours(np.zeros((64, 64), np.uint8)))  # no body: no verdict


def test_a_phantom_windowed_per_slice_records_its_windows(tmp_path):
    from comp.data.phantom import generate
    from comp.data.labels import WINDOWS_CSV, read_windows

    root = generate(tmp_path / "p", n_train=3, n_labelled=2, n_test=1, seed=1, workers=1, window_per_slice=PER_SLICE_EXAMPLE)
    w = read_windows(Path(root) / WINDOWS_CSV, image_names(3))
    assert w.shape == (3, 2) and (w[:, 0] >= -3100).all() and (w[:, 0] <= -1000).all() and (w[:, 1] >= 1000).all()
    assert "window_per_slice=" in (Path(root) / "PHANTOM.txt").read_text()


@pytest.mark.slow
def test_a_run_whose_folds_moved_with_its_groups_is_refused_on_resume(tmp_path, tiny_phantom):
    import shutil

    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.pipeline.workspace import RunDir

    data_root = tmp_path / "data"
    shutil.copytree(tiny_phantom, data_root)
    exp = load_experiment("baseline_watershed_stretched")
    assert run_cv(exp, Dataset(data_root), 2, tmp_path / "runs", only=0) is None  # fold 1 left for later
    (folder,) = (tmp_path / "runs" / exp.name).iterdir()
    run = RunDir(folder)
    ids, folds = run.folds()
    together = {int(ids[folds == 0][0]), int(ids[folds == 1][0])}  # apart in the run, one group now: they must share a fold
    names = image_names(12)
    (data_root / "groups.csv").write_text("image,group\n" + "".join(f"{n},{'a' if i in together else 'b'}\n" for i, n in enumerate(names)))
    with pytest.raises(UserError, match="folds.csv"):
        run_cv(exp, Dataset(data_root), 2, tmp_path / "runs", only=1)
    assert not run.fold_done(1)


@pytest.mark.slow
def test_a_finished_run_on_folds_that_moved_is_not_reused(tmp_path, tiny_phantom):
    """`results --reuse` and pseudo-label teachers take a finished run only while its folds are the data's now."""
    import shutil

    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import finished_run, run_cv

    data_root = tmp_path / "data"
    shutil.copytree(tiny_phantom, data_root)
    exp = load_experiment("baseline_watershed_stretched")
    done = run_cv(exp, Dataset(data_root), 2, tmp_path / "runs")
    assert finished_run(exp, Dataset(data_root), 2, tmp_path / "runs").run_dir == done.run_dir
    names = image_names(12)
    (data_root / "groups.csv").write_text("image,group\n" + "".join(f"{n},{'a' if i < 6 else 'b'}\n" for i, n in enumerate(names)))
    assert finished_run(exp, Dataset(data_root), 2, tmp_path / "runs") is None


@pytest.mark.slow
def test_cv_json_reports_every_groups_score_and_their_standard_error(tmp_path, tiny_phantom):
    """Per scan block where the data has groups, per fold where folds are random; the leaderboard shows the worst."""
    import json
    import shutil

    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.report.leaderboard import write_leaderboard

    data_root = tmp_path / "data"
    shutil.copytree(tiny_phantom, data_root)
    exp = load_experiment("baseline_watershed_stretched")
    plain = json.loads((run_cv(exp, Dataset(data_root), 2, tmp_path / "runs").run_dir / "cv.json").read_text())["per_group"]
    assert plain["by"] == "fold" and [g["group"] for g in plain["groups"]] == ["0", "1"]
    names = image_names(12)
    (data_root / "groups.csv").write_text("image,group\n" + "".join(f"{n},{'abcd'[i % 4]}\n" for i, n in enumerate(names)))
    s = json.loads((run_cv(exp, Dataset(data_root), 2, tmp_path / "runs2").run_dir / "cv.json").read_text())
    pg = s["per_group"]
    means = np.array([g["ari"] for g in pg["groups"]])
    assert pg["by"] == "group" and len(means) == 4 and sum(g["n"] for g in pg["groups"]) == s["n_images"] == 8
    assert np.isclose(np.average(means, weights=[g["n"] for g in pg["groups"]]), s["mean_ari"])
    assert np.isclose(pg["se"], means.std(ddof=1) / 2)
    assert f"{means.min():.4f} / {pg['se']:.4f} (4 groups)" in write_leaderboard(tmp_path / "runs2").read_text()
