"""Where a method's per-slice CV loss sits: per image, a run on the per-slice rendering against a run on the one-window
rendering of the same slices and folds, by fold and against each slice's window width (HU per grey level).

Usage: .venv/bin/python scripts/per_slice_diff.py PER_SLICE_RUN ONE_WINDOW_RUN [--windows data/proxy_ps/windows.csv]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from comp.pipeline.workspace import RunDir


def _scores(run: str) -> dict[str, tuple[int, float]]:
    """image -> (fold, ARI) of a finished run's OOF scores."""
    with open(RunDir(Path(run)).scores_file) as fh:
        return {r["image"]: (int(r["fold"]), float(r["ari"])) for r in csv.DictReader(fh)}


def main() -> None:
    """Print the mean change, per fold, and its correlation with the slices' HU per grey level."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("per_slice")
    ap.add_argument("one_window")
    ap.add_argument("--windows", default="data/proxy_ps/windows.csv")
    a = ap.parse_args()
    ps, ow = _scores(a.per_slice), _scores(a.one_window)
    with open(a.windows) as fh:
        hu = {r["image"]: (float(r["hi"]) - float(r["lo"])) / 255 for r in csv.DictReader(fh)}
    names = sorted(set(ps) & set(ow), key=lambda n: int(n.split(".")[0]))
    if any(ps[n][0] != ow[n][0] for n in names):
        raise SystemExit("error: the two runs' folds differ: their images cannot be compared fold by fold")
    diff = np.array([ps[n][1] - ow[n][1] for n in names])
    folds = np.array([ps[n][0] for n in names])
    width = np.array([hu[n] for n in names])
    per_fold = " ".join(f"{f}: {diff[folds == f].mean():+.4f} (one window {np.mean([ow[n][1] for n in names if ow[n][0] == f]):.4f})"
                        for f in sorted(set(folds)))  # fmt: skip
    print(f"{len(names)} images: mean change {diff.mean():+.4f}; by fold {per_fold}; "
          f"correlation with HU per grey level {np.corrcoef(diff, width)[0, 1]:+.3f}")


if __name__ == "__main__":
    main()
