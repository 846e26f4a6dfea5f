"""Experiments are data: YAML files looked up by name, validated key by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from comp.baselines import SmoothWatershedParams
from comp.config import load_experiment
from comp.errors import UserError
from tests.conftest import ROOT, run_cli


def test_every_shipped_experiment_loads() -> None:
    names = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    assert {"baseline_watershed", "smooth_watershed"} <= set(names)
    for name in names:
        exp = load_experiment(str(ROOT / "experiments" / f"{name}.yaml"))
        assert exp.name == name


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


def test_cli_bad_config_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("method: smooth_watershed\nparams: {sigmaa: 2}\n")
    r = run_cli("cv", str(path), "--data", str(tmp_path))
    assert r.returncode == 2 and "unknown key 'params.sigmaa'" in r.stderr and "Traceback" not in r.stderr
