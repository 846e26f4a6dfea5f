"""The HTML report builds from a tiny run and renders (headless Chromium, where Debian's package is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import fake_run, run_cli

CHROMIUM = shutil.which("chromium")


def _report(tiny_phantom: Path, tmp_path: Path) -> Path:
    run = fake_run(tmp_path, tiny_phantom, "rep")
    (run / "fold0").mkdir(exist_ok=True)
    (run / "fold0" / "history.json").write_text('[{"epoch": 0, "loss": 2.0, "val_ari": 0.3}, {"epoch": 1, "loss": 1.5, "val_ari": 0.5}]')
    r = run_cli("report", str(run), "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.split("report: ")[-1].strip())


@pytest.mark.slow
def test_report_builds_from_a_tiny_run(tiny_phantom: Path, tmp_path: Path) -> None:
    page = _report(tiny_phantom, tmp_path)
    text = page.read_text()
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert "oof_ari_hist.png" in pngs and "train_loss_0.png" in pngs and "val_ari_0.png" in pngs and "regions.png" in pngs
    assert "<th>split</th><th>merged</th>" in text
    assert len([p for p in pngs if p.startswith("worst_")]) == 8  # every OOF image of the tiny set (fewer than 12)
    for name in pngs:
        assert f'src="{name}"' in text
    assert "| cv | rep |" in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("first_format", [False, True])
def test_report_of_an_ensemble_with_merging(first_format: bool, tiny_phantom: Path, tmp_path: Path) -> None:
    from comp.pipeline.ensemble import merger_path, save_ensemble, single_member
    from comp.methods.merge import Merger, save_merger

    run = fake_run(tmp_path, tiny_phantom, "merged", boundaries=False)
    spec = single_member("m", run)
    spec.merge.enabled, spec.merge.threshold = True, 0.5
    save_ensemble(spec, tmp_path)
    save_merger(Merger({-1: 0.0, 0: 0.0, 1: 0.0}, 0.5), merger_path("m", tmp_path))
    if first_format:  # the test model only, as comp wrote it before fold models were kept
        merger_path("m", tmp_path).write_text("# threshold 0.5\nconstant 0.0\n")
    r = run_cli("report", "m", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert ("refitting them" in r.stdout) == first_format
    page = Path(r.stdout.split("report: ")[-1].strip())
    assert "ensemble m: OOF ARI" in page.read_text()


def test_report_of_unknown_target_is_a_user_error(tiny_phantom: Path, tmp_path: Path) -> None:
    r = run_cli("report", "nothing_here", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "no finished CV run or ensemble" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_phantom: Path, tmp_path: Path) -> None:
    page = _report(tiny_phantom, tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 50).mean() > 0.01  # dark image panels rendered, not just text on white


@pytest.mark.slow
def test_a_truncated_cv_json_is_named_and_skipped_not_a_crash(tiny_phantom: Path, tmp_path: Path) -> None:
    """A crash or a full disk can leave half a cv.json: leaderboard, report and ensemble name it and go on."""
    good = fake_run(tmp_path, tiny_phantom, "good")
    bad = fake_run(tmp_path, tiny_phantom, "bad")
    (bad / "cv.json").write_text('{"experiment": "bad", "mean_a')
    for cmd in (["leaderboard"], ["report"], ["ensemble", "--name", "e"]):
        r = run_cli(*cmd, "--runs", str(tmp_path), *([] if cmd == ["leaderboard"] else ["--data", str(tiny_phantom)]))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert f"skipped {bad / 'cv.json'}: not a readable run summary" in r.stderr, (cmd, r.stderr)
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| good |" in board and "| bad |" not in board and str(good) in board


def test_report_with_nothing_to_report_says_so(tiny_phantom: Path, tmp_path: Path) -> None:
    r = run_cli("report", "--data", str(tiny_phantom), "--runs", str(tmp_path))
    assert r.returncode == 2 and "nothing to report yet" in r.stderr and "of that name" not in r.stderr
