"""The fit-seed table of `scripts/as_it_comes.sh noise`: per method, each rendering's CV at every fit seed, their mean
and spread, and the per-slice change of the means with its standard error, in markdown.

Usage: .venv/bin/python scripts/noise_table.py [runs/as_it_comes.tsv]
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def main() -> None:
    """Print one row per method: the seeds' scores on both renderings, means +/- seed std, change +/- its std error."""
    rows = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "runs/as_it_comes.tsv", sep="\t")
    rows = rows[rows["table"].str.startswith("noise-s")]
    print("| method | seeds | proxy, one window | proxy, per slice | per-slice change (± s.e.) |")
    print("|---|---|---|---|---|")
    for exp, g in rows.groupby("experiment", sort=False):
        one, per = (g[g["data"] == d].set_index("table")["mean_ari"] for d in ("proxy", "proxy_ps"))
        seeds = sorted(set(one.index) & set(per.index))
        a, b = one[seeds].to_numpy(), per[seeds].to_numpy()
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(seeds) > 1 else float("nan")
        cells = [f"{' / '.join(f'{v:.4f}' for v in x)} (mean {x.mean():.4f} ± {x.std(ddof=1) if len(x) > 1 else 0:.4f})" for x in (a, b)]
        print(f"| `{exp}` | {len(seeds)} | {cells[0]} | {cells[1]} | {b.mean() - a.mean():+.4f} ± {se:.4f} |")


if __name__ == "__main__":
    main()
