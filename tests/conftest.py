"""Shared fixtures: a tiny phantom data set in the exact challenge layout, made once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep .npy caches out of the data folders the tests make."""
    os.environ["COMP_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training slices (8 annotated) and 4 test slices."""
    from comp.data.phantom import generate

    return generate(tmp_path_factory.mktemp("phantom"), n_train=12, n_labelled=8, n_test=4, seed=3, workers=2)


# A network small enough to train 2 folds x 2 epochs on the tiny phantom in seconds.
TINY_UNET = """
method: unet
params:
  model: {encoder: tu-mobilenetv3_small_100, decoder_channels: [16, 8, 8, 8, 8], embedding_dim: 4}
  train: {epochs: 2, batch_size: 4, resolution: 64, lr: 0.003}
  post: {min_size: 10}
  workers: 1
cv: {folds: 2}
"""


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m comp ARGS` (extra environment `env`) and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "comp", *args], cwd=cwd, env=env, capture_output=True, text=True)


def fake_run(runs: Path, data_root: Path, name: str, fg_level: float = 0.9, boundaries: bool = True,
             post: dict | None = None, res: int = 64, folds: int = 2, noise: float = 0.0, seed: int = 0) -> Path:  # fmt: skip
    """A finished CV run folder whose cached OOF maps are derived from the truth (no training).

    fg_level: foreground probability inside structures; boundaries: whether touching borders are marked;
    noise: Gaussian noise added to every map. Embeddings are one random vector per true structure.
    """

    import numpy as np
    from scipy import ndimage as ndi

    from comp.pipeline.cv import make_folds
    from comp.nets.targets import resize_labels
    from comp.data.dataset import Dataset
    from comp.core.metric import image_score
    from comp.core.store import save_maps
    from comp.pipeline.workspace import RunDir

    data = Dataset(data_root)
    ann = data.annotated
    fold_of = make_folds(len(ann), folds, 0)
    rng = np.random.default_rng(seed)
    run = RunDir(runs / name / f"20260101-000000-{name[:8]:0>8}-{data.fingerprint()['y_train'][:6]}-k{folds}")
    run.write_config({"name": name, "method": "unet", "params": {"post": post or {}}, "cv": {"folds": folds, "seed": 0}, "data": data.fingerprint()})
    for f in range(folds):
        ids = ann[fold_of == f]
        maps = []
        for i in ids:
            t = resize_labels(data.y_train[i], res).astype(np.int64)
            fg = (t > 0) * fg_level
            touch = (ndi.maximum_filter(t, 3) != ndi.minimum_filter(np.where(t > 0, t, 999), 3)) & (t > 0)
            bnd = touch.astype(float) if boundaries else np.zeros_like(fg)
            dist = np.zeros_like(fg)
            for lab in np.unique(t[t > 0]):
                d = ndi.distance_transform_edt(t == lab)
                dist = np.where(t == lab, d / max(d.max(), 1), dist)
            vec = rng.normal(size=(256, 4)) * 2
            emb = vec[t].transpose(2, 0, 1) * (t > 0)
            m = np.concatenate([np.stack([fg, bnd, dist]), emb]) + rng.normal(0, noise, (7, res, res))
            m[:3] = np.clip(m[:3], 0, 1)
            maps.append(m.astype(np.float16))
        save_maps(run.oof_maps_file(f), np.stack(maps))
        pred = data.y_train[ids].copy()
        pred[:, 256:] = 0  # half of each truth: a visible, scorable prediction
        scores = np.array([image_score(t, p) for t, p in zip(data.y_train[ids], pred)])
        run.write_fold(f, ids, pred, scores, {"fold": f})
    summary = {"experiment": name, "method": "unet", "dataset": data.fingerprint(), "mean_ari": 0.0, "std_ari": 0.0,
               "n_images": int(len(ann)), "folds": [{"fold": f} for f in range(folds)]}  # fmt: skip
    run.write_summary(summary)
    return run.path


# A tiny network and a tiny unet experiment (a template: format epochs=), shared by the nets and methods tests.
TINY_NET = dict(decoder_channels=[16, 8, 8, 8, 8], embedding_dim=4)


TINY_EXP = """
method: unet
params:
  model: {{encoder: tu-mobilenetv3_small_100, decoder_channels: [16, 8, 8, 8, 8], embedding_dim: 4}}
  train: {{epochs: {epochs}, batch_size: 4, resolution: 64, lr: 0.003}}
  post: {{min_size: 10}}
  workers: 1
cv: {{folds: 2}}
"""


def cv_process(exp: Path, data: Path, runs: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "comp", "cv", str(exp), "--data", str(data), "--runs", str(runs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
