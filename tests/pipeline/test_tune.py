"""Tuning, learned merging, ensemble selection and leaderboard on crafted OOF maps (no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY_UNET, fake_run, run_cli

from comp.core.errors import UserError
from comp.data.dataset import Dataset
from comp.methods.merge import fit_fold_mergers, load_merger, pair_features, pair_targets, save_merger
from comp.nets.targets import PostParams
from comp.pipeline.ensemble import EnsembleSpec, MemberRef, build_ensemble, load_ensemble, save_ensemble
from comp.pipeline.oof import OOF
from comp.pipeline.study import storage_url
from comp.pipeline.tune import tune


def _spec(run: Path, data: Path, name: str = "t") -> EnsembleSpec:
    return EnsembleSpec(name=name, members=[MemberRef(str(run), 1.0)], post=PostParams(), data=Dataset(data).fingerprint())


@pytest.mark.slow
def test_a_few_trials_beat_the_defaults(tiny_phantom: Path, tmp_path: Path) -> None:
    # Foreground probability 0.45 inside structures: the default threshold 0.5 finds nothing.
    run = fake_run(tmp_path, tiny_phantom, "weak", fg_level=0.45)
    data = Dataset(tiny_phantom)
    oof = OOF.load([run], data)
    default = oof.scores([1.0], PostParams(), workers=1).mean()
    spec = _spec(run, tiny_phantom)
    r = tune(spec, oof, tmp_path, trials=8, workers=1, merge=False)
    assert r.trials_complete == 8
    assert r.oof_ari > default + 0.2, (r, default)
    stored = load_ensemble("t", tmp_path)
    assert stored.oof_ari == pytest.approx(r.oof_ari) and stored.post.fg_threshold < 0.45
    # The honest number is stored beside the in-sample one: each fold scored by a search on the other fold.
    assert stored.nested_ari == pytest.approx(r.nested_ari) and r.nested_ari > default + 0.2 and r.baseline_ari == pytest.approx(default)
    # A later, worse search (one trial: the stored settings only) never overwrites the stored result.
    stored.nested_ari = 0.999
    save_ensemble(stored, tmp_path)
    r2 = tune(load_ensemble("t", tmp_path), oof, tmp_path, trials=1, workers=1, merge=False, images=4)
    assert not r2.stored and load_ensemble("t", tmp_path).nested_ari == 0.999


@pytest.mark.slow
def test_no_nested_search_when_no_trial_beats_the_stored_settings(tiny_phantom: Path, tmp_path: Path, monkeypatch) -> None:
    import comp.pipeline.tune

    run = fake_run(tmp_path, tiny_phantom, "good")
    oof = OOF.load([run], Dataset(tiny_phantom))
    default = oof.scores([1.0], PostParams(), workers=1).mean()
    monkeypatch.setattr(comp.pipeline.tune, "inner_study", lambda *a, **k: pytest.fail("nested search for settings nothing beat"))
    r = tune(_spec(run, tiny_phantom, "same"), oof, tmp_path, trials=1, workers=1, merge=False)  # the stored settings only
    assert r.nested_ari == pytest.approx(default) and r.oof_ari == pytest.approx(default)
    monkeypatch.undo()  # with a trial that beats them, the nested searches run
    calls = []
    monkeypatch.setattr(comp.pipeline.tune, "inner_study", lambda *a, **k: calls.append(1) or comp.pipeline.tune.start_params(_spec(run, tiny_phantom), False))
    weak = fake_run(tmp_path, tiny_phantom, "weak", fg_level=0.45)
    tune(_spec(weak, tiny_phantom, "weak"), OOF.load([weak], Dataset(tiny_phantom)), tmp_path, trials=6, workers=1, merge=False)
    assert len(calls) == len(np.unique(oof.folds))


def _complete_trials(db: Path) -> list[tuple[int, float]]:
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    url = f"sqlite:///{db}"
    try:
        names = optuna.study.get_all_study_names(url)
    except (IntegrityError, OperationalError):  # the tuner is still creating the schema: nothing to count yet
        return []
    if not names:  # the database exists but the study is not created yet
        return []
    (name,) = names
    study = optuna.load_study(study_name=name, storage=url)
    return [(t.number, t.value) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]


def _tune_cli(data: Path, runs: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "comp", "tune", "killme", "--data", str(data), "--runs", str(runs), "--workers", "1", "--no-merge", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_killed_study_resumes(tiny_phantom: Path, tmp_path: Path) -> None:
    run = fake_run(tmp_path, tiny_phantom, "killme", noise=0.05)
    save_ensemble(_spec(run, tiny_phantom, "killme"), tmp_path)
    db = tmp_path / "tune" / "killme.db"
    p = _tune_cli(tiny_phantom, tmp_path, "--trials", "40", start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if db.exists() and len(_complete_trials(db)) >= 2:
            break
        assert p.poll() is None, p.stdout.read()  # it must still be running, not have failed
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    before = _complete_trials(db)
    assert 2 <= len(before) < 40, "the study should be killed midway"
    p2 = _tune_cli(tiny_phantom, tmp_path, "--trials", str(len(before) + 2))
    out, _ = p2.communicate(timeout=300)
    assert p2.returncode == 0, out
    after = _complete_trials(db)
    assert f"{len(before)} complete trials, running 2 more" in out
    assert len(after) == len(before) + 2 and after[: len(before)] == before


def _crafted_pair_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Truth: a disc (1) and two touching squares (2, 3). Prediction: the disc cut in two, squares right."""
    yy, xx = np.mgrid[:512, :512]
    cy, cx, r = rng.integers(120, 200), rng.integers(120, 200), rng.integers(50, 80)
    truth = np.zeros((512, 512), np.uint8)
    truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 1
    truth[300:400, 250:330] = 2
    truth[300:400, 330:420] = 3
    pred = truth.copy()
    pred[(truth == 1) & (xx > cx)] = 4  # the disc split along a vertical line
    image = np.where(truth == 1, 120, np.where(truth == 2, 160, np.where(truth == 3, 90, 20))).astype(np.uint8)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    maps = np.zeros((3, 512, 512), np.float32)
    maps[0] = truth > 0
    maps[1, 300:400, 328:332] = 0.9  # a clear boundary between the squares, none across the cut disc
    maps[2] = 0.5
    return truth, pred, image, maps


def test_lightgbm_merging_joins_a_split_region() -> None:
    rng = np.random.default_rng(0)
    xs, ys, folds = [], [], []
    for i in range(24):
        truth, pred, image, maps = _crafted_pair_image(rng)
        pairs, x = pair_features(pred, maps, image)
        xs.append(x)
        ys.append(pair_targets(pred, truth, pairs))
        folds.append(np.full(len(x), i % 2))
    y = np.concatenate(ys)
    assert 0 < y.sum() < len(y)
    merger = fit_fold_mergers(np.concatenate(xs), y, np.concatenate(folds), threshold=0.5)
    truth, pred, image, maps = _crafted_pair_image(np.random.default_rng(99))
    merged = merger.apply(pred, maps, image)
    assert len(np.unique(merged[truth == 1])) == 1, "the two halves of the disc should be one region"
    assert merged[350, 300] != merged[350, 380], "the touching squares must stay apart"
    assert len(np.unique(merged)) - 1 == 3


@pytest.mark.slow
def test_merge_classifiers_train_after_a_network_without_hanging(tiny_phantom: Path, tmp_path: Path) -> None:
    """A network trained in this process (torch's OpenMP pool ran) must not hang LightGBM's training after it,
    in forked workers (fold mergers) or here (a single classifier, as the hybrid trains its own)."""
    (tmp_path / "tiny.yaml").write_text("name: tiny\n" + TINY_UNET)
    code = (
        "import numpy as np\nfrom pathlib import Path\nfrom comp.pipeline.config import load_experiment\nfrom comp.pipeline.cv import run_cv\n"
        "from comp.data.dataset import Dataset\nfrom comp.methods.merge import fit_fold_mergers, train_without\n"
        f"run_cv(load_experiment('{tmp_path / 'tiny.yaml'}'), Dataset(Path('{tiny_phantom}')), 2, Path('{tmp_path / 'runs'}'))\n"
        "rng = np.random.default_rng(0); x = rng.normal(size=(100000, 24)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int8)\n"
        "m = fit_fold_mergers(x, y, rng.integers(0, 3, len(y)), workers=2)\n"
        "p = m.probabilities(x[:200], 0); assert sorted(m.models) == [-1, 0, 1, 2] and ((p > 0.5) == (y[:200] > 0)).mean() > 0.9\n"
        "assert len(train_without([-1], x, y, np.zeros(len(y), np.int64), workers=2)[-1]) > 1000\n"
        "print('trained')\n"
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "trained" in out.stdout, out.stderr[-2000:]


def test_saved_merger_keeps_every_fold_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = [_crafted_pair_image(rng) for _ in range(12)]
    feats = [pair_features(pred, maps, image) for truth, pred, image, maps in rows]
    x = np.concatenate([f[1] for f in feats])
    y = np.concatenate([pair_targets(r[1], r[0], f[0]) for r, f in zip(rows, feats)])
    folds = np.concatenate([np.full(len(f[1]), i % 3) for i, f in enumerate(feats)])
    merger = fit_fold_mergers(x, y, folds, threshold=0.4)
    save_merger(merger, tmp_path / "m.merge.txt")
    loaded = load_merger(tmp_path / "m.merge.txt")
    assert sorted(loaded.models) == [-1, 0, 1, 2] and loaded.threshold == 0.4
    for k in (-1, 0, 1, 2):  # the OOF pictures of fold k are merged by the model that never saw fold k
        np.testing.assert_allclose(loaded.probabilities(x, k), merger.probabilities(x, k))
    (tmp_path / "old.merge.txt").write_text("# threshold 0.6\nconstant 0.9\n")  # the first format: test model only
    old = load_merger(tmp_path / "old.merge.txt")
    assert old.models == {-1: 0.9} and old.threshold == 0.6


@pytest.mark.slow
def test_selection_picks_the_better_model(tiny_phantom: Path, tmp_path: Path) -> None:
    good = fake_run(tmp_path, tiny_phantom, "good")
    bad = fake_run(tmp_path, tiny_phantom, "bad", boundaries=False, noise=0.3, seed=1)
    spec, written = build_ensemble("sel", [bad, good], Dataset(tiny_phantom), tmp_path, max_steps=3, workers=1)
    assert written
    weights = {Path(m.run).parent.name: m.weight for m in spec.members}
    assert weights.get("good", 0) > weights.get("bad", 0)
    assert spec.history[2]["added"].startswith("good/")  # the first greedy step
    r = run_cli("leaderboard", "--runs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| ensemble | sel |" in board and "| cv | good |" in board
    assert spec.nested_ari is not None and f"| ensemble | sel | {spec.nested_ari:.4f} |" in board


@pytest.mark.slow
def test_ensemble_of_a_run_without_maps_is_a_user_error(tiny_phantom: Path, tmp_path: Path) -> None:
    run = fake_run(tmp_path, tiny_phantom, "nomaps")
    (run / "oof" / "fold1_maps.npy").unlink()
    r = run_cli("ensemble", str(run), "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "no cached OOF maps" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tune", str(run), "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "no cached OOF maps" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("ensembles/*.yaml"))  # nothing saved for a run that cannot be tuned


POSTGRES = os.environ.get("COMP_TEST_POSTGRES")


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="COMP_TEST_POSTGRES unset: .ci/run starts a PostgreSQL server and sets it")
def test_two_workers_share_a_postgresql_study(tiny_phantom: Path, tmp_path: Path) -> None:
    import optuna

    run = fake_run(tmp_path, tiny_phantom, "shared", noise=0.05)
    name = f"pg{os.getpid()}{int(time.time())}"
    save_ensemble(_spec(run, tiny_phantom, name), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "comp", "tune", name, "--data", str(tiny_phantom), "--runs", str(tmp_path),
           "--workers", "1", "--no-merge", "--trials", "10", "--storage", POSTGRES, "--images", "4"]  # fmt: skip
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    mine = [{int(line.split()[1].rstrip(":")) for line in o.splitlines() if line.startswith("trial ")} for o in outs]
    assert mine[0] and mine[1] and not mine[0] & mine[1], "each trial is run by exactly one worker"
    url = storage_url(POSTGRES, name, tmp_path)
    (study_name,) = [s for s in optuna.study.get_all_study_names(url) if s.startswith(name)]
    trials = optuna.load_study(study_name=study_name, storage=url).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "no trial duplicated"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), "no trial lost"
    assert set(numbers) == mine[0] | mine[1]
    assert 10 <= len(numbers) <= 11  # the target; a worker may finish one trial already started


def test_tune_config_is_data(tiny_phantom: Path, tmp_path: Path) -> None:
    run = fake_run(tmp_path, tiny_phantom, "cfg")
    spec = _spec(run, tiny_phantom, "cfg")
    path = save_ensemble(spec, tmp_path)
    raw = yaml.safe_load(path.read_text())
    assert raw["members"][0]["run"] == str(run) and raw["post"]["fg_threshold"] == 0.5
    path.write_text(path.read_text().replace("fg_threshold", "fg_treshold"))
    r = run_cli("tune", "cfg", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "unknown key 'post.fg_treshold'" in r.stderr


@pytest.mark.slow
def test_cv_ensemble_tune_submit_end_to_end(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tinyunet.yaml"
    exp.write_text(TINY_UNET)
    runs = str(tmp_path / "runs")
    common = ("--data", str(tiny_phantom), "--runs", runs)
    r = run_cli("cv", str(exp), *common)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("ensemble", "tinyunet", "--name", "e2e", "--workers", "1", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("tune", "e2e", "--trials", "3", "--workers", "1", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in-sample" in r.stdout and "nested" in r.stdout
    for extra in ((), ("--cached",)):
        out = tmp_path / f"sub{len(extra)}.csv"
        r = run_cli("submit", "--ensemble", "e2e", "--out", str(out), "--workers", "1", *common, *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "valid submission for 4 test images" in r.stdout and "s per slice" in r.stdout
        assert run_cli("validate-submission", str(out), "--data", str(tiny_phantom)).returncode == 0
    # One slice at a time (bounded memory) gives the same submission as the default chunks.
    r = run_cli("submit", "--ensemble", "e2e", "--out", str(tmp_path / "one.csv"), "--chunk", "1", "--workers", "1", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "sub0.csv").read_bytes()
    board = (tmp_path / "runs" / "leaderboard.md").read_text()
    assert "python -m comp cv" in board and "| ensemble | e2e |" in board


def test_nested_scores_never_search_the_images_they_score() -> None:
    from comp.pipeline.select import nested_scores

    folds = np.array([0, 1, 2, 0, 1, 2, 0])
    idx = np.arange(7)
    searched: list[set] = []

    def search(inner: np.ndarray) -> set:
        searched.append(set(inner.tolist()))
        return set(inner.tolist())

    def score(found: set, held: np.ndarray) -> np.ndarray:
        assert not found & set(held.tolist())  # what was found never saw the images it scores
        return np.full(len(held), float(folds[held[0]]))

    out = nested_scores(folds, idx, search, score)
    assert list(out) == [0, 1, 2, 0, 1, 2, 0] and len(searched) == 3
    assert searched[0] == {1, 2, 4, 5}  # fold 0 is scored with a search on folds 1 and 2


@pytest.mark.slow
def test_tune_params_restricts_the_space(tiny_phantom: Path, tmp_path: Path) -> None:
    run = fake_run(tmp_path, tiny_phantom, "few", fg_level=0.45)
    oof = OOF.load([run], Dataset(tiny_phantom))
    r = tune(_spec(run, tiny_phantom, "few"), oof, tmp_path, trials=4, workers=1, merge=False, params=["fg_threshold"])
    stored = load_ensemble("few", tmp_path)
    assert r.stored and stored.post.min_size == PostParams().min_size and stored.post.seed_threshold == PostParams().seed_threshold
    r = run_cli("tune", "few", "--params", "fg_treshold", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "unknown parameter 'fg_treshold'" in r.stderr


@pytest.mark.slow
def test_the_printed_dashboard_command_reads_the_tuned_study(tiny_phantom: Path, tmp_path: Path) -> None:
    """The dashboard line `tune` prints opens the very study it ran (here SQLite; PostgreSQL URLs alike)."""
    import io
    import shlex

    from optuna_dashboard import wsgi

    run = fake_run(tmp_path, tiny_phantom, "dash", noise=0.05)
    save_ensemble(_spec(run, tiny_phantom, "dash"), tmp_path)
    r = run_cli("tune", "dash", "--data", str(tiny_phantom), "--runs", str(tmp_path), "--trials", "2", "--no-merge",
                "--workers", "1", "--images", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("watch it live"))
    cmd = shlex.split(line.split(": ", 1)[1])
    assert cmd[0].endswith("optuna-dashboard") and (ROOT / cmd[0]).is_file()
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "SERVER_NAME": "x", "SERVER_PORT": "80", "QUERY_STRING": "",
           "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http"}  # fmt: skip
    status: list[str] = []
    body = b"".join(wsgi(cmd[1])(env, lambda st, headers, exc=None: status.append(st)))
    names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
    assert status == ["200 OK"] and any(n.startswith("dash-") for n in names)


@pytest.mark.slow
def test_superpixel_hybrid_wins_where_the_maps_fail_and_submit_reproduces_it(tiny_phantom: Path, tmp_path: Path) -> None:
    """A blank foreground channel: the maps' watershed finds nothing, superpixels merged by fold classifiers do."""
    from comp.pipeline.submit import submit_ensemble

    run = fake_run(tmp_path, tiny_phantom, "blind", fg_level=0.0, boundaries=False)
    data = Dataset(tiny_phantom)
    oof = OOF.load([run], data)
    r = tune(_spec(run, tiny_phantom, "sp"), oof, tmp_path, trials=2, workers=1)
    stored = load_ensemble("sp", tmp_path)
    assert r.regions.startswith("superpixels") and stored.regions is not None and stored.merge.enabled
    assert r.nested_ari > r.baseline_ari + 0.1, r
    merger = load_merger(tmp_path / "ensembles" / "sp.merge.txt")
    assert sorted(merger.models) == [-1, 0, 1] and merger.max_rounds == 16  # fold k's images merged by a model blind to k
    # The stored file reproduces the OOF score it claims, and submit applies the same hybrid to the test slices.
    again = oof.scores([1.0], stored.post, merger, workers=1, regions=stored.regions)
    assert again.mean() == pytest.approx(stored.oof_ari)
    # The tuning made every image's superpixels once; a fresh OOF, which makes them on each call, scores the same.
    assert oof.given(0, stored.regions) is not None and OOF.load([run], data).given(0, stored.regions) is None
    assert np.array_equal(OOF.load([run], data).scores([1.0], stored.post, merger, workers=1, regions=stored.regions), again)
    (run / "test").mkdir(exist_ok=True)
    from comp.core.store import save_maps
    from comp.pipeline.workspace import RunDir

    save_maps(RunDir(run).test_maps_file(0), np.zeros((4, 7, 64, 64), np.float32))
    save_maps(RunDir(run).test_maps_file(1), np.zeros((4, 7, 64, 64), np.float32))
    out = submit_ensemble("sp", data, tmp_path / "sp.csv", tmp_path, cached=True, workers=1)
    assert out["mean_regions"] > 2 and out["test_ari"] > 0.1


@pytest.mark.slow
def test_tune_fits_mergers_of_the_kind_asked_for_and_the_stored_file_reproduces_them(tiny_phantom: Path, tmp_path: Path) -> None:
    """Average linkage, relative features, calibration, features dropped: recorded in the ensemble and merger files;
    the classifiers never split on a dropped feature; the score replays."""
    from comp.methods.merge import FEATURE_GROUPS, FEATURES, RELATIVE, MergeKind

    run = fake_run(tmp_path, tiny_phantom, "blind", fg_level=0.0, boundaries=False)
    oof = OOF.load([run], Dataset(tiny_phantom))
    drop = FEATURE_GROUPS["gradients"] + FEATURE_GROUPS["sizes"]
    r = tune(_spec(run, tiny_phantom, "kind"), oof, tmp_path, trials=2, workers=1, kind=MergeKind("average", True, True, drop))
    stored = load_ensemble("kind", tmp_path)
    assert r.regions.startswith("superpixels") and stored.merge.enabled
    assert (stored.merge.linkage, stored.merge.relative, stored.merge.calibrate) == ("average", True, True)
    assert stored.merge.drop == list(drop) and stored.merge.kind().drop == drop  # a re-tune keeps them
    merger = load_merger(tmp_path / "ensembles" / "kind.merge.txt")
    assert (merger.linkage, merger.relative, merger.drop) == ("average", True, drop) and len(merger.calibration.x) >= 2
    assert set(merger.fold_calibrations) == set(map(int, np.unique(oof.folds)))  # each fold model its own map, kept
    import lightgbm as lgb

    used = lgb.Booster(model_str=merger.models[-1]).feature_importance("split")  # the classifiers saw the RELATIVE columns
    assert sum(used[FEATURES.index(f)] for f in RELATIVE) > 0
    assert all(used[FEATURES.index(f)] == 0 for f in drop) and sum(used) > 0
    assert oof.scores([1.0], stored.post, merger, workers=1, regions=stored.regions).mean() == pytest.approx(stored.oof_ari)


def test_a_retune_keeps_the_stored_merger_kind_where_no_flag_is_given() -> None:
    from comp.methods.merge import MergeKind
    from comp.pipeline.ensemble import MergeSpec

    stored = MergeSpec(linkage="average", relative=True)
    assert stored.kind() == MergeKind("average", True)
    assert stored.kind(relative=False) == MergeKind("average", False)
    assert stored.kind("classifier") == MergeKind("classifier", True)
    assert MergeSpec(calibrate=True).kind() == MergeKind(calibrate=True) and not MergeSpec(calibrate=True).kind(calibrate=False).calibrate
    assert MergeSpec(drop=["int_mean"]).kind().drop == ("int_mean",) and MergeSpec(drop=["int_mean"]).kind(drop=[]).drop == ()


def test_an_unknown_linkage_is_one_clear_error_before_any_work(tmp_path: Path) -> None:
    r = run_cli("tune", "nothing", "--linkage", "single", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "--linkage" in r.stderr and "average" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unknown_feature_to_drop_is_one_clear_error_before_any_work(tmp_path: Path) -> None:
    r = run_cli("tune", "nothing", "--drop-features", "border_grad", "gradient", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2 and "--drop-features" in r.stderr and "'gradient'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_merging_can_start_from_another_runs_regions_and_submit_reproduces_it(tiny_phantom: Path, tmp_path: Path) -> None:
    """Blind maps: the maps' watershed finds nothing; an instance-predicting run's OOF regions (kept, or merged
    by fold classifiers that read the maps) are the tuned ensemble, and submit starts from that method's test fit."""
    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.core.errors import UserError
    from comp.core.store import save_maps
    from comp.pipeline.workspace import RunDir
    from comp.pipeline.submit import submit_ensemble

    data = Dataset(tiny_phantom)
    blind = fake_run(tmp_path, tiny_phantom, "blind", fg_level=0.0, boundaries=False)
    inst = run_cv(load_experiment("baseline_watershed_stretched"), data, 2, tmp_path)
    oof = OOF.load([blind], data)
    r = tune(_spec(blind, tiny_phantom, "rr"), oof, tmp_path, trials=2, workers=1, superpixels=False, region_runs=[inst.run_dir])
    stored = load_ensemble("rr", tmp_path)
    assert stored.regions is not None and stored.regions.run == str(inst.run_dir) and inst.run_dir.parent.name in r.regions
    assert r.nested_ari > r.baseline_ari + 0.1 and r.nested_ari >= inst.mean - 0.05, (r, inst.mean)
    merger = load_merger(tmp_path / "ensembles" / "rr.merge.txt") if stored.merge.enabled else None
    again = oof.scores([1.0], stored.post, merger, workers=1, regions=stored.regions)
    assert again.mean() == pytest.approx(stored.oof_ari)
    for f in range(2):
        save_maps(RunDir(blind).test_maps_file(f), np.zeros((4, 7, 64, 64), np.float32))
    out = submit_ensemble("rr", data, tmp_path / "rr.csv", tmp_path, cached=True, workers=1)
    assert out["test_ari"] > 0.1 and list((tmp_path / "baseline_watershed_stretched").glob("submit-*/test_pred.npz"))
    # Regions from a run on other folds would come from models that saw the images they split: refused.
    other = run_cv(load_experiment("baseline_watershed_stretched"), data, 3, tmp_path)
    with pytest.raises(UserError, match="folds differ"):
        OOF.load([blind], data).run_labels(str(other.run_dir))


def test_a_killed_tunes_running_trial_is_failed_when_the_study_reopens(tmp_path: Path) -> None:
    """kill -9 leaves its trial RUNNING in the study for ever (dashboard, counts); reopening fails it. A live
    worker's trial (another process on a shared storage) is left alone."""
    import socket

    import optuna
    from optuna.trial import TrialState

    from comp.pipeline.study import WORKER, open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s", 0)
    dead, live = study.ask(), study.ask()
    dead.set_user_attr(WORKER, f"{2**22 + 4321}@{socket.gethostname()}")  # no such process
    live.set_user_attr(WORKER, f"{os.getpid()}@{socket.gethostname()}")
    open_study(url, "s", 0)
    states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}
    assert states == {dead.number: TrialState.FAIL, live.number: TrialState.RUNNING}


def test_regions_from_a_run_on_other_folds_is_refused_before_any_search(tiny_phantom: Path, tmp_path: Path) -> None:
    run = fake_run(tmp_path, tiny_phantom, "maps")
    other = fake_run(tmp_path, tiny_phantom, "regions3", folds=3)
    with pytest.raises(UserError, match="folds differ"):
        tune(_spec(run, tiny_phantom, "early"), OOF.load([run], Dataset(tiny_phantom)), tmp_path, trials=2, workers=1, region_runs=[other])
    assert not (tmp_path / "tune" / "early.db").exists() and not (tmp_path / "tune").exists()


@pytest.mark.slow
def test_the_leaderboard_shows_the_commands_that_reproduce_a_tuned_ensemble(tiny_phantom: Path, tmp_path: Path) -> None:
    """Selection, then the tune call whose settings are stored: the selection alone scores something else."""
    from comp.report.leaderboard import leaderboard_rows

    run = fake_run(tmp_path, tiny_phantom, "lb", noise=0.05)
    spec = _spec(run, tiny_phantom, "e1")
    spec.command = "python -m comp ensemble lb --name e1"
    save_ensemble(spec, tmp_path)
    r = tune(spec, OOF.load([run], Dataset(tiny_phantom)), tmp_path, trials=2, workers=1, merge=False, command="python -m comp tune e1 --trials 2")
    assert r.stored and r.bar is None
    row = next(x for x in leaderboard_rows(tmp_path) if x["name"] == "e1")
    assert row["command"] == "python -m comp ensemble lb --name e1 && python -m comp tune e1 --trials 2"


@pytest.mark.slow
def test_ensembling_a_method_without_maps_says_so(tiny_phantom: Path, tmp_path: Path) -> None:
    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv

    run_cv(load_experiment("baseline_watershed_stretched"), Dataset(tiny_phantom), 2, tmp_path)
    r = run_cli("ensemble", "baseline_watershed_stretched", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "cache no maps" in r.stderr and "comp tune baseline_watershed_stretched" in r.stderr, r.stderr
    maps = fake_run(tmp_path, tiny_phantom, "maps")
    r = run_cli("tune", str(maps), "--regions-from", "../baseline_watershed_stretched", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "may only use letters" in r.stderr, r.stderr


@pytest.mark.slow
def test_tune_says_what_a_result_had_to_beat_to_be_stored(tiny_phantom: Path, tmp_path: Path) -> None:
    """The bar printed is the one applied (the stored nested estimate), not the stored settings' in-sample score."""
    run = fake_run(tmp_path, tiny_phantom, "bar", noise=0.05)
    save_ensemble(_spec(run, tiny_phantom, "bar"), tmp_path)
    args = ("tune", "bar", "--data", str(tiny_phantom), "--runs", str(tmp_path), "--workers", "1", "--no-merge", "--trials", "2")
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing was stored yet" in r.stdout and "to beat:" not in r.stdout, r.stdout + r.stderr
    stored = load_ensemble("bar", tmp_path).nested_ari
    r = run_cli(*args[:-1], "3")
    assert r.returncode == 0 and f"to be stored it had to beat {stored:.4f}" in r.stdout, r.stdout + r.stderr


def test_greedy_selection_keeps_the_simpler_ensemble_when_the_gain_is_within_its_spread() -> None:
    """Hand-made per-image scores: a second member that gains +0.02 on average, all of it on one fold of three, is
    refused (gain within its per-fold standard error); the same mean gain spread evenly over the folds is kept."""
    from types import SimpleNamespace

    import numpy as np

    from comp.pipeline.select import gain_and_se, greedy_select

    folds = np.repeat([0, 1, 2], 10)
    base = np.full(30, 0.70)
    lumpy = base + np.where(folds == 0, 0.08, -0.01)  # +0.02 on average, all from one fold
    even = base + 0.02
    for second, kept in ((lumpy, False), (even, True)):
        table = {(1, 0): base, (0, 1): second - 0.05, (1, 1): second, (2, 0): base, (0, 2): second - 0.05}

        class Stub:
            members = [SimpleNamespace(label="a"), SimpleNamespace(label="b")]

            def __init__(self) -> None:
                self.folds = folds

            def scores(self, counts, post, idx=None, workers=0):
                return table.get(tuple(counts), base - 0.1)

        counts, path = greedy_select(Stub(), None, max_steps=3)
        assert (counts[1] > 0) == kept, (counts, path)
    gain, se = gain_and_se(lumpy, base, folds)
    assert np.isclose(gain, 0.02) and se > gain
