"""Does the tuned ensemble's per-slice loss (issue 23) follow each slice's grey step or its calibration error?

Scores the two crossings tuned by scripts/per_slice_cross.py (one window on one window, per slice on per slice) image
by image, and splits the per-slice minus one-window difference by each per-slice slice's own grey step (HU per grey
level, from its calibration) and by its calibration's error at soft tissue (40 HU; the truth from the rendering's
windows.csv). In-sample: a diagnostic, nothing selected on it.

Usage: .venv/bin/python scripts/per_slice_steps.py ONE_WINDOW_RUN PER_SLICE_RUN [--runs DIR]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from comp.data.calibration import slice_calibration
from comp.data.dataset import Dataset
from comp.methods.merge import load_merger
from comp.pipeline.ensemble import load_ensemble, merger_path
from comp.pipeline.oof import OOF
from comp.pipeline.workspace import RunDir


def ensemble_scores(run: Path, name: str, runs: Path) -> tuple[np.ndarray, Dataset, np.ndarray]:
    """Per-image OOF ARI of a tuned ensemble on its run's images, the data set and the OOF image ids."""
    data = Dataset(RunDir(run).summary()["dataset"]["root"])
    oof = OOF.load([run], data)
    spec = load_ensemble(name, runs)
    merger = load_merger(merger_path(name, runs))
    merger.threshold = spec.merge.threshold
    return oof.scores([1.0], spec.post, merger, workers=2, regions=spec.regions), data, oof.members[0].ids


def slice_errors(data: Dataset, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's grey step (HU per level) and its calibration's HU error at 40 HU (NaN without landmarks)."""
    win = [(float(r["lo"]), float(r["hi"])) for r in csv.DictReader(open(Path(data.root) / "windows.csv"))]
    step, err = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    for k, i in enumerate(ids):
        c = slice_calibration(data.x_train[i])
        if c is not None:
            lo, hi = win[i]
            step[k], err[k] = c.hu(1.0) - c.hu(0.0), abs(c.hu((40 - lo) / (hi - lo) * 255) - 40)
    return step, err


def main() -> None:
    """Print the difference by tercile of grey step and of calibration error."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("one_window", type=Path)
    ap.add_argument("per_slice", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/per_slice_cross"))
    a = ap.parse_args()
    ow = ensemble_scores(a.one_window, "cross-one-one", a.runs)[0]
    ps, data, ids = ensemble_scores(a.per_slice, "cross-per-per", a.runs)
    d = ps - ow
    print(f"one window {ow.mean():.4f}, per slice {ps.mean():.4f}, difference {d.mean():+.4f} on {len(d)} images")
    for what, v in zip(("grey step (HU/level)", "calibration error at 40 HU"), slice_errors(data, ids)):
        ok = np.isfinite(v)
        cuts = np.nanpercentile(v, [0, 33.3, 66.7, 100])
        print(f"{what}: correlation with the difference {np.corrcoef(d[ok], v[ok])[0, 1]:+.3f}")
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            m = ok & (v >= lo) & (v <= hi)
            print(f"  {lo:.1f}-{hi:.1f}: {m.sum()} images, difference {d[m].mean():+.4f}")


if __name__ == "__main__":
    main()
