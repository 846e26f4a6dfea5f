"""Which merge features carry to data the merger was not fitted on: backward elimination of feature groups by transfer.

A hybrid experiment is fitted on every annotated slice of --fit (`comp transfer`) with each remaining group of its
merger's features dropped (merge.FEATURE_GROUPS), and scored on --select, a validation data set that is never
reported. The group whose removal gains most is dropped when that gain beats the standard error of its per-slice
gains (the one-standard-error rule); then the next round. The kept set is finally scored on the --score data sets,
which no round looked at. Rows go to stdout and to --tsv.

Usage: .venv/bin/python scripts/feature_carry.py hybrid_relative_average --fit data/proxy --select data/phantom_s1
       --score data/phantom [--groups shape sizes ...] [--runs runs] [--tsv runs/feature_carry.tsv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from comp.data.sets import resolve_data
from comp.methods.merge import FEATURE_GROUPS
from comp.pipeline.config import load_experiment
from comp.pipeline.select import gain_and_se
from comp.pipeline.transfer import TransferResult, transfer
from comp.pipeline.workspace import TransferRecord

HEAD = "round\tdropped\tscored_on\tari\tgain\tse\tregions\tsplit\tmerged\n"


def fitted(name: str, drop: list[str], fit, data: list, runs: Path) -> list[TransferResult]:
    """The experiment with these features dropped, fitted on `fit` and scored on `data`."""
    exp = load_experiment(name, [f"params.drop_features={json.dumps(drop)}"])
    return transfer(exp, fit, data, runs=runs, command=f"feature_carry.py {name} drop {','.join(drop)}")


def per_slice(res: TransferResult) -> np.ndarray:
    """The per-slice ARIs a transfer record holds."""
    return np.array([r["ari"] for r in TransferRecord(Path(res.path)).read()["images"]])


def gain_se(new: TransferResult, old: TransferResult) -> tuple[float, float]:
    """Mean per-slice gain of `new` over `old` (the same slices) and its standard error (each slice its own group)."""
    a, b = per_slice(new), per_slice(old)
    return gain_and_se(a, b, np.arange(len(a)))


def row(step: str, groups: list[str], r: TransferResult, gain: float = 0.0, se: float = 0.0) -> str:
    """One table row."""
    return (f"{step}\t{'+'.join(groups) or '-'}\t{r.score}\t{r.mean_ari:.4f}\t{gain:+.4f}\t{se:.4f}\t{r.mean_regions:.1f}\t"
            f"{r.split:.1f}\t{r.merged:.1f}")  # fmt: skip


def eliminate(name: str, base: list[str], start: list[str], todo: list[str], fit, select, runs: Path, out) -> list[str]:
    """Groups dropped (beside the experiment's own `base` drops) round by round while the best drop beats its standard
    error on `select`."""
    drop = lambda gs: sorted(set(base) | {f for g in gs for f in FEATURE_GROUPS[g]})  # noqa: E731
    kept, groups = fitted(name, drop(start), fit, [select], runs)[0], list(start)
    out(row("0", groups, kept))
    for step in range(1, len(todo) + 1):
        tried = {g: fitted(name, drop(groups + [g]), fit, [select], runs)[0] for g in todo if g not in groups}
        scored = {g: gain_se(r, kept) for g, r in tried.items()}
        for g, r in tried.items():
            out(row(str(step), groups + [g], r, *scored[g]))
        best = max(scored, key=lambda g: scored[g][0], default=None)
        if best is None or scored[best][0] <= scored[best][1]:
            break
        groups, kept = groups + [best], tried[best]
    return drop(groups)


def main() -> None:
    """Eliminate on --select, then score the kept set (and the experiment as it is) on --score."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--fit", required=True)
    ap.add_argument("--select", required=True, help="validation data set the rounds choose on (never reported)")
    ap.add_argument("--score", nargs="+", default=[], help="data sets the kept set is reported on")
    ap.add_argument("--groups", nargs="+", default=["shape", "sizes", "levels", "steps", "step_rel", "gradients"],
                    choices=sorted(FEATURE_GROUPS), help="groups that may be dropped")  # fmt: skip
    ap.add_argument("--start", nargs="*", default=[], choices=sorted(FEATURE_GROUPS), help="groups dropped from the start")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--tsv", default="runs/feature_carry.tsv")
    a = ap.parse_args()
    fit, select, runs = resolve_data(a.fit), resolve_data(a.select), Path(a.runs)
    tsv = Path(a.tsv)
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text(HEAD)

    def out(line: str) -> None:
        print(line, flush=True)
        with tsv.open("a") as fh:
            fh.write(line + "\n")

    print(HEAD, end="")
    base = load_experiment(a.experiment).params.drop_features
    dropped = eliminate(a.experiment, base, a.start, a.groups, fit, select, runs, out)
    print(f"kept: params.drop_features={json.dumps(dropped)}")
    scores = [resolve_data(d) for d in a.score]
    for as_is, new in zip(fitted(a.experiment, list(base), fit, scores, runs), fitted(a.experiment, dropped, fit, scores, runs)):
        out(row("as is", [], as_is))
        out(row("kept", ["kept"], new, *gain_se(new, as_is)))


if __name__ == "__main__":
    main()
