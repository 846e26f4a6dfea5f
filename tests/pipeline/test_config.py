"""Experiments are data: YAML files looked up by name, validated key by key."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from comp.core.errors import UserError
from comp.methods.baselines import SmoothWatershedParams
from comp.pipeline.config import load_experiment
from tests.conftest import ROOT, run_cli


def test_every_shipped_experiment_loads() -> None:
    """Segmentation experiments in experiments/, pretraining ones in experiments/pretrain/: one folder per kind."""
    from comp.pipeline.pretrain import load_ssl_config

    names = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    assert {"baseline_watershed", "smooth_watershed"} <= set(names) and not any(n.startswith("ssl_") for n in names)
    for name in names:
        assert load_experiment(str(ROOT / "experiments" / f"{name}.yaml")).name == name
    pretraining = sorted((ROOT / "experiments" / "pretrain").glob("*.yaml"))
    assert len(pretraining) == 8
    for path in pretraining:
        assert load_ssl_config(str(path)).name == path.stem


def test_lookup_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    exp = load_experiment("smooth_watershed")
    assert isinstance(exp.params, SmoothWatershedParams) and exp.params.fit_images == 24


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: smooth_watershed\nparams: {sigmaa: 2}\n", "unknown key 'params.sigmaa'"),
        ("method: smooth_watershed\nparams: {sigma: fast}\n", "'params.sigma' must be a number"),
        ("method: smooth_watershed\nparams: {min_size: 2.5}\n", "'params.min_size' must be an integer"),
        ("method: nope\n", "unknown method 'nope'"),
        ("params: {}\n", "missing key 'method'"),
        ("method: smooth_watershed\nfolds: 3\n", "unknown key 'folds'"),
        ("method: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_config_keys(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as exc:
        load_experiment(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.slow
def test_cli_bad_config_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("method: smooth_watershed\nparams: {sigmaa: 2}\n")
    r = run_cli("cv", str(path), "--data", str(tmp_path))
    assert r.returncode == 2 and "unknown key 'params.sigmaa'" in r.stderr and "Traceback" not in r.stderr


def test_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    exp = load_experiment("unet_cpu", ["params.train.budget=0.25", "cv.folds=4"])
    assert exp.params.train.budget == 0.25 and exp.cv.folds == 4
    assert exp.digest() != load_experiment("unet_cpu").digest()  # an override is a different run
    with pytest.raises(UserError, match="unknown key 'params.train.budgett'"):
        load_experiment("unet_cpu", ["params.train.budgett=0.25"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_experiment("unet_cpu", ["params.train.budget"])


@pytest.mark.slow
def test_names_that_would_escape_runs_are_user_errors(tmp_path, tiny_phantom):
    exp = tmp_path / "escape.yaml"
    exp.write_text("name: ../../x\nmethod: official_watershed\n")
    r = run_cli("cv", str(exp), "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "name '../../x' may only use" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    r = run_cli("ensemble", "--name", "../x", "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "ensemble name '../x'" in r.stderr


def test_score_into_a_closed_pipe_exits_quietly(tmp_path, tiny_phantom):
    import subprocess

    csv = tiny_phantom / "Y_test.csv"
    cmd = f"{sys.executable} -m comp score {csv} {csv} | head -n 0; echo rc=${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert "rc=0" in r.stdout and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.slow
def test_unwritable_outputs_fail_before_the_work(tmp_path, tiny_phantom):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("submit", "baseline_watershed", "--data", str(tiny_phantom), "--out", str(blocker / "sub.csv"))
    assert r.returncode == 2 and "cannot write the submission there" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("cv", "baseline_watershed", "--data", str(tiny_phantom), "--runs", str(blocker / "runs"))
    assert r.returncode == 2 and "cannot write the run folders there" in r.stderr
    assert "fold 0" not in r.stdout  # nothing was fitted first


def test_every_shipped_student_and_variant_is_a_delta_of_its_base() -> None:
    """Students, CPU encoder variants and GPU variants are written as `base:` deltas, so they cannot drift from what
    they are compared with (a student's gain is measured against its teacher)."""
    raw = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "experiments").glob("*.yaml")}
    students = {n: r for n, r in raw.items() if n.endswith("_pseudo")}
    assert set(students) >= {"unet_cpu_pseudo", "unet_resnet18_cpu_pseudo", "unet_effb0_cpu_pseudo"}
    for name, r in students.items():
        assert r["base"] == r["pseudo"]["teacher"] and set(r) <= {"name", "description", "base", "params", "pseudo"}, name
        assert set(r["params"]) == {"train"} and set(r["params"]["train"]) == {"epochs"}, name
    for name, base in [("unet_effb0_cpu", "unet_cpu"), ("unet_resnet18_cpu", "unet_cpu"), ("unet_fg_cc_cpu", "unet_cpu"),
                       ("unet_effb0", "unet_resnet34"), ("unet_mnv3", "unet_resnet34"), ("unet_fg_cc", "unet_resnet34")]:  # fmt: skip
        assert raw[name]["base"] == base and "method" not in raw[name] and "cv" not in raw[name], name
    ssl = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "experiments" / "pretrain").glob("*.yaml")}
    roots = {n for n, r in ssl.items() if "base" not in r}
    assert roots == {"ssl_mim_mnv3", "ssl_mim_resnet34"}, "each pretraining variant is a delta of the CPU or the GPU one"
    assert all(set(r) <= {"name", "description", "base", "model", "method", "mask_ratio", "local_weight"} for n, r in ssl.items() if n not in roots)


@pytest.mark.parametrize("name, override, message", [
    ("unet_cpu", "params.train.epochs=0", "'params.train.epochs' must be at least 1, got 0"),
    ("unet_cpu", "params.train.epochs=-1", "'params.train.epochs' must be at least 1, got -1"),
    ("smooth_watershed", "params.sigma=-1", "'params.sigma' must be at least 0, got -1.0"),
    ("unet_cpu_pseudo", "pseudo.images=-5", "'pseudo.images' must be at least 0, got -5"),
    ("hybrid", "params.fit_h=[.nan]", "'params.fit_h[0]' must be a finite number"),
    ("hybrid", "params.fit_h=[-0.01]", "'params.fit_h' must be above 0, got -0.01"),
    ("hybrid", "params.fit_thresholds=[]", "'params.fit_thresholds' needs at least 1 value, got []"),
    ("hybrid", "params.superpixels.h=0", "'params.superpixels.h' must be above 0, got 0.0"),
    ("smooth_watershed", "cv.folds=1", "'cv.folds' must be at least 2, got 1"),
    ("unet_cpu", "params.train.budget=1.5", "'params.train.budget' must be above 0 and at most 1, got 1.5"),
    ("smooth_watershed", "cv.groups=scan", "'cv.groups' must be one of auto, file, inferred, none, got 'scan'"),
    ("unet_cpu", "contrast.per_slice=maybe", "'contrast.per_slice' must be auto, true or false, got 'maybe'"),
    ("unet_cpu", "params.train.augment_on=gpu", "'params.train.augment_on' must be host or device, got 'gpu'"),
    ("unet_cpu", "params.train.checkpoint_every=0", "'params.train.checkpoint_every' must be at least 1, got 0"),
])  # fmt: skip
def test_values_out_of_their_declared_range_are_refused(name: str, override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        load_experiment(name, [override])


@pytest.mark.slow
def test_a_bad_value_stops_cv_before_any_run_folder(tmp_path: Path, tiny_phantom: Path) -> None:
    """A NaN superpixel depth once hung the hybrid's workers; now it is one line before any work."""
    r = run_cli("cv", "hybrid", "--set", "params.fit_h=[.nan]", "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "finite number" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs" / "hybrid").exists()


@pytest.mark.parametrize("args, message", [
    (["cv", "smooth_watershed", "--folds", "0"], "--folds: must be at least 2, got '0'"),
    (["data", "stats", "{data}", "--images", "-3"], "--images: must be at least 0, got '-3'"),
    (["data", "stats", "{data}", "--superpixels", "nan"], "--superpixels: expected a finite number, got 'nan'"),
    (["data", "stats", "{data}", "--superpixels", "0"], "--superpixels: must be above 0, got '0'"),
    (["data", "stats", "{data}", "--superpixels", "-0.01"], "--superpixels: must be above 0, got '-0.01'"),
    (["tune", "smooth_watershed", "--trials", "0"], "--trials: must be at least 1, got '0'"),
    (["tune", "smooth_watershed", "--runs", "{file}"], "is a file, not a runs folder"),
])  # fmt: skip
def test_bad_numbers_on_the_command_line_are_one_line_exit_2(tmp_path: Path, tiny_phantom: Path, args: list[str], message: str) -> None:
    (tmp_path / "f.txt").write_text("x")
    r = run_cli(*[a.format(data=tiny_phantom, file=tmp_path / "f.txt") for a in args], cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_experiment_is_a_delta_of_its_base(tmp_path) -> None:
    """`base: NAME`: the base's keys with the variant's laid over (nested ones key by key); the name is the variant's;
    a loop is one clear error."""
    import pytest

    from comp.pipeline.config import load_experiment
    from comp.core.errors import UserError

    (tmp_path / "a.yaml").write_text("method: hybrid\nname: a\nparams: {fit_images: 8, threshold: 0.4}\ncv: {folds: 4}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\nparams: {{threshold: 0.6, drop_features: [pos_x]}}\n")
    b = load_experiment(str(tmp_path / "b.yaml"))
    assert (b.name, b.params.fit_images, b.params.threshold, b.params.drop_features, b.cv.folds) == ("b", 8, 0.6, ["pos_x"], 4)
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\nmethod: hybrid\n")
    with pytest.raises(UserError, match="leads back to itself"):
        load_experiment(str(tmp_path / "b.yaml"))


def test_a_merger_trained_without_some_features_ignores_them() -> None:
    """The hybrid's classifier trained with `drop_features` never splits on them (here the only informative one);
    the drop survives a save and load."""
    import tempfile
    from pathlib import Path

    import lightgbm as lgb
    import numpy as np

    from comp.methods.hybrid import _train
    from comp.methods.merge import FEATURES, Merger, load_merger, save_merger

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = (x[:, FEATURES.index("pos_x")] > 0).astype(np.int8)  # only the position says it
    rows = [(x[:200], y[:200]), (x[200:], y[200:])]
    used = lambda text: lgb.Booster(model_str=text).feature_importance()[FEATURES.index("pos_x")]  # noqa: E731
    assert used(_train([rows], np.arange(2))) > 0 and used(_train([rows], np.arange(2), ["pos_x"])) == 0
    with tempfile.TemporaryDirectory() as d:
        save_merger(Merger({-1: _train([rows], np.arange(2), ["pos_x"])}, drop=("pos_x",)), Path(d) / "m.txt")
        assert load_merger(Path(d) / "m.txt").drop == ("pos_x",)
