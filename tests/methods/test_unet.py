"""The unet method in CV: cached maps, two processes on one run, what post-processing workers get."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from comp.nets.models import EMB0
from comp.pipeline.workspace import RunDir
from tests.conftest import TINY_EXP, cv_process


@pytest.mark.slow
def test_tiny_training_end_to_end_caches_maps(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXP.format(epochs=2))
    p = cv_process(exp, tiny_phantom, tmp_path / "runs")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    run = next((tmp_path / "runs" / "tiny").iterdir())
    cv = json.loads((run / "cv.json").read_text())
    assert cv["n_images"] == 8
    for k in (0, 1):
        maps = RunDir(run).oof_maps(k)
        assert maps.values.dtype == np.uint8 and maps.shape == (4, EMB0 + 4, 64, 64)  # cached quantised
        assert len(RunDir(run).test_maps(k)) == 4
        assert (run / f"fold{k}" / "best.pt").is_file() and (run / f"fold{k}" / "last.pt").is_file()
        assert len(json.loads((run / f"fold{k}" / "history.json").read_text())) == 2


@pytest.mark.slow
def test_two_processes_share_one_run_each_fold_once_same_score(tiny_phantom: Path, tmp_path: Path) -> None:
    """`make cv GPUS="0 1"` in miniature: two processes on one run folder split its folds and match a one-process run."""
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXP.format(epochs=2).replace("folds: 2", "folds: 3"))
    procs = [cv_process(exp, tiny_phantom, tmp_path / "runs") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(outs)
    for f in range(3):
        assert text.count(f"fold {f}: ARI") == 1, text  # trained exactly once, by one of the two
    run = RunDir(next((tmp_path / "runs" / "tiny").iterdir()))
    assert run.finished and len(list((tmp_path / "runs" / "tiny").iterdir())) == 1
    one = cv_process(exp, tiny_phantom, tmp_path / "one")
    assert one.wait(timeout=600) == 0
    alone = RunDir(next((tmp_path / "one" / "tiny").iterdir())).summary()
    # Fresh-clone CI once saw 1.4e-4 apart at ARI 0.014 (2026-12-03); six two-process repeats beside a busy `make
    # results` gave weights bit-identical to one process, so the cause is not found. The fold counts above are what
    # catch a fold trained twice or skipped.
    assert abs(alone["mean_ari"] - run.summary()["mean_ari"]) < 2e-3


def test_post_processing_workers_get_only_the_channels_they_read(monkeypatch, tmp_path: Path) -> None:
    """Cached 12-channel maps, no embedding merge: the workers are sent 3 channels, lazily; with the merge, all 12."""
    import comp.methods.unet as learned
    from comp.nets.targets import PostParams
    from comp.core.store import load_maps, save_maps

    save_maps(tmp_path / "m.npy", np.random.default_rng(0).random((3, 12, 16, 16)).astype(np.float32))
    sent = []
    monkeypatch.setattr(learned, "pmap", lambda fn, items, *a, **k: [sent.append(items[i].shape) or np.zeros((512, 512), np.uint8) for i in range(len(items))])
    method = learned.LearnedInstances(learned.LearnedParams(post=PostParams()))
    method.postprocess_maps(load_maps(tmp_path / "m.npy"))
    method.p.post.merge_embedding = 0.5
    method.postprocess_maps(load_maps(tmp_path / "m.npy"))
    assert sent == [(3, 16, 16)] * 3 + [(12, 16, 16)] * 3
