"""`comp data stats` on a hand-built data set whose counts, touching pairs and annotated share are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from comp.data.images import SIZE, image_names, write_images
from comp.data.labels import write_label_csv
from tests.conftest import run_cli


def _hand_built(root: Path) -> Path:
    """3 training slices (2 annotated) and 1 test slice; fat (115) and soft-tissue (131) grey peaks."""
    rng = np.random.default_rng(0)
    x = np.full((3, SIZE, SIZE), 115, np.uint8)
    x[:, 100:400, 100:400] = 131
    x = np.clip(x + rng.integers(-1, 2, x.shape), 0, 255).astype(np.uint8)
    y = np.zeros((3, SIZE, SIZE), np.uint8)
    # Slice 0: regions 5 and 9 touch (a shared border), region 7 stands apart: 3 regions, 2 touching.
    y[0, 0:64, 0:64] = 5
    y[0, 0:64, 64:128] = 9
    y[0, 200:232, 200:264] = 7
    # Slice 1: one region, alone.
    y[1, 300:428, 300:428] = 3
    write_images(root / "X_train", x)
    write_label_csv(root / "Y_train.csv", y, image_names(3))
    write_images(root / "X_test", x[:1])
    return root


def test_stats_counts_touching_and_share(tmp_path: Path) -> None:
    from comp.data.dataset import Dataset
    from comp.report.stats import data_stats

    s = data_stats(Dataset(_hand_built(tmp_path / "d")), workers=1)
    assert (s.train_slices, s.annotated_slices, s.test_slices) == (3, 2, 1)
    assert s.regions_mean == pytest.approx(2.0) and s.regions_std == pytest.approx(1.0)
    share = (64 * 128 + 32 * 64 + 128 * 128) / (2 * SIZE * SIZE)
    assert s.annotated_share == pytest.approx(share)
    assert s.touching_share == pytest.approx(2 / 4)
    assert s.region_size_mean == pytest.approx(np.mean([64 * 64, 64 * 64, 32 * 64, 128 * 128]) / SIZE**2)
    # The oracle joins 5 and 9 into one component: slice 0 scores below 1, slice 1 scores 1.
    assert 0 < s.oracle_ari < 1
    assert abs(s.fat - 115) < 1.5 and abs(s.soft - 131) < 1.5


def test_markdown_table_keeps_a_row_only_some_data_sets_have(tmp_path: Path) -> None:
    """A per-slice data set with windows.csv beside one without: its recovery row shows, '—' for the other (no KeyError)."""
    from dataclasses import replace

    from comp.data.dataset import Dataset
    from comp.report.stats import data_stats, render_markdown

    s = data_stats(Dataset(_hand_built(tmp_path / "d")), workers=1)
    w = {"per_slice": True, "low_end_hu_5_50_95": [], "high_end_hu_5_50_95": [], "hu_per_grey_5_50_95": [], "lacking_landmarks": 0,
         "slices": 3, "within_5%": 1.0, "within_2%": 2 / 3}  # fmt: skip
    plain = {k: v for k, v in w.items() if not k.startswith("within")} | {"per_slice": False}
    table = render_markdown([replace(s, name="plain", windows=plain), replace(s, name="ps", windows=w)])
    assert "| windows recovered within 5% / 2% (windows.csv) | — | — | 100.0% / 66.7% |" in table


@pytest.mark.slow
def test_stats_cli_markdown_and_missing_folder(tmp_path: Path) -> None:
    root = _hand_built(tmp_path / "d")
    r = run_cli("data", "stats", str(root), "--markdown", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "| regions per slice | 18 ± 7 | 2.0 ± 1.0 |" in r.stdout
    assert "| touching share | most separated | 50% of regions touch another |" in r.stdout
    r = run_cli("data", "stats", str(tmp_path / "nope"))
    assert r.returncode == 2 and "data folder not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_superpixel_ceilings_fall_as_superpixels_coarsen(tiny_phantom) -> None:
    from comp.data.dataset import Dataset
    from comp.report.stats import data_stats, rows

    s = data_stats(Dataset(tiny_phantom), images=3, workers=1, superpixel_h=[0.002, 0.05])
    (n_fine, c_fine), (n_coarse, c_coarse) = s.superpixels["0.002"], s.superpixels["0.05"]
    assert n_fine > n_coarse > 0 and 0.5 < c_fine <= 1.0 and c_coarse < c_fine
    assert rows(s)["superpixels h=0.002: per slice / ceiling ARI"].endswith(f"{c_fine:.3f}")
