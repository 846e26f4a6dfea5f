"""How far a network's transfer moves with the fold it was fitted on: each fold model of a CV run alone, and the fold
models' maps averaged (the way the results suite and an ensemble transfer a run), on another data set's annotated
slices, each read through the contrast step resolved on that data set. Rows are appended to --tsv when given.

Usage: .venv/bin/python scripts/fold_transfer.py --score data/phantom [--tsv runs/fold_transfer.tsv] RUN [RUN...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from comp.core.errors import UserError
from comp.data.sets import resolve_data
from comp.pipeline.transfer import transfer_fold_models

HEAD = "run\tscored_on\tfold_aris\tmin\tmax\taveraged\tregions_averaged\tstructures\n"


def main() -> None:
    """Print (and append) one row per run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--score", required=True, help="data set whose annotated slices are scored")
    ap.add_argument("--tsv", help="append the rows to this file (header written when new)")
    a = ap.parse_args()
    data = resolve_data(a.score)
    for run in a.runs:
        rows = transfer_fold_models(Path(run), data)
        folds, avg = [r.mean_ari for r in rows if r.fold >= 0], rows[-1]
        line = (f"{run}\t{data.name}\t{','.join(f'{v:.4f}' for v in folds)}\t{min(folds):.4f}\t{max(folds):.4f}\t"
                f"{avg.mean_ari:.4f}\t{avg.mean_regions:.1f}\t{avg.true_regions:.1f}")  # fmt: skip
        print(line, flush=True)
        if a.tsv:
            new = not Path(a.tsv).is_file()
            with open(a.tsv, "a") as fh:
                fh.write((HEAD if new else "") + line + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a wrong run or data folder: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
