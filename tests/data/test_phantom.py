"""The phantom: exact challenge layout, deterministic per seed, and the properties that make it a useful stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from comp.data.dataset import Dataset
from comp.data.images import N_PIXELS
from comp.data.phantom import render_slice


def test_layout(tiny_phantom: Path) -> None:
    assert sorted(p.name for p in (tiny_phantom / "X_train").iterdir()) == sorted(f"{i}.png" for i in range(12))
    assert len(list((tiny_phantom / "X_test").iterdir())) == 4
    head = pd.read_csv(tiny_phantom / "Y_train.csv", index_col=0, nrows=3)
    assert list(head.columns) == [f"{i}.png" for i in range(12)]
    assert list(head.index) == ["Pixel 0", "Pixel 1", "Pixel 2"]
    d = Dataset(tiny_phantom)
    counts = d.y_train.reshape(12, -1).astype(bool).sum(1)
    assert (counts[:8] > 0).all() and (counts[8:] == 0).all()  # only the first L columns annotated
    assert d.y_train.shape[1] * d.y_train.shape[2] == N_PIXELS


def test_deterministic_per_seed() -> None:
    a, b, c = render_slice(11), render_slice(11), render_slice(12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_regions_connected_counted_and_touching() -> None:
    touching = 0
    for seed in range(12):
        img, lab = render_slice(seed)
        assert img.dtype == np.uint8 and lab.dtype == np.uint8
        ids = np.unique(lab[lab > 0])
        assert 5 <= len(ids) <= 30
        for i in ids:
            assert ndi.label(lab == i)[1] == 1  # each structure is one connected region
        # Structures touching with no background gap (so boundaries matter).
        diff = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
        touching += bool(diff.any())
    assert touching >= 10


def test_visible_but_unannotated_structures() -> None:
    img, lab = render_slice(4)
    body = img > 60  # fat, muscle wall and table are visible ...
    assert body.mean() > 2 * (lab > 0).mean()  # ... but only organs, vessels, bones and lesions are marked


def test_perfect_foreground_components_are_not_enough() -> None:
    """As on real CT, touching structures make connected components of a perfect mask fall short."""
    from comp.core.metric import image_score

    scores = [image_score(lab, ndi.label(lab > 0)[0].astype(np.uint8)) for _, lab in map(render_slice, range(12))]
    assert 0.3 < np.mean(scores) < 0.9


def test_orientations_vary() -> None:
    # Where the spine (the brightest structure) lies relative to the body's centre changes between slices.
    angles = []
    for seed in range(16):
        img, _ = render_slice(seed)
        by, bx = np.argwhere(img > 60).mean(0)
        sy, sx = np.argwhere(ndi.gaussian_filter(img.astype(float), 3) > 200).mean(0)
        angles.append(np.arctan2(sy - by, sx - bx))
    assert np.ptp(np.cos(angles)) > 1.0 and np.ptp(np.sin(angles)) > 1.0
