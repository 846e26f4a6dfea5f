"""`make results`: regenerate the README's quality table (baselines, fg+CC, every single model, best ensemble) from scratch.

Per data set: CV of every listed experiment, greedy ensemble selection over the learned ones, Optuna
tuning with learned merging, and held-out ARI on the test split where the data set ships its labels
(the phantom). The table goes to runs/results.md and between the README's results markers.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.fields import bounded
from comp.core.log import LOG, result
from comp.core.machine import machine
from comp.data.sets import resolve_data
from comp.methods.merge import MergeKind
from comp.pipeline.config import extra_override, from_dict, load_experiment
from comp.pipeline.cv import finished_run, run_cv
from comp.pipeline.ensemble import build_ensemble, load_ensemble, save_ensemble, single_member
from comp.pipeline.oof import OOF, has_maps, run_experiment
from comp.pipeline.submit import submit, submit_ensemble
from comp.pipeline.transfer import transfer, transfer_ensemble
from comp.pipeline.tune import tune
from comp.pipeline.workspace import RunDir, Workspace

START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Suite:
    """What `make results` runs (experiments/suites/*.yaml)."""

    folds: int = bounded(3, lo=2)
    trials: int = bounded(40, lo=1)
    datasets: dict = field(default_factory=lambda: {"phantom": ""})
    baseline: str = "baseline_watershed"
    stretched: str = "baseline_watershed_stretched"  # the same recipe behind the contrast step
    fg_cc: str = "unet_fg_cc_cpu"  # "" = no fg U-Net + connected components row
    singles: list[str] = field(default_factory=lambda: ["unet_cpu"])
    select_steps: int = bounded(8, lo=1)  # greedy ensemble selection: at most this many additions
    select_images: int = bounded(0, lo=0)  # greedy selection scored on this many OOF images (0 = all)
    regions_from: list[str] | None = None  # instance singles whose OOF regions the tuning may start from (None: all)
    extra: dict = field(default_factory=dict)  # data name -> data folders whose annotated slices join every training part (cv.extra)
    transfer: dict = field(default_factory=dict)  # data name -> a data folder ("" = the embedded phantom) every row fitted there is scored on
    merge: MergeKind = field(default_factory=MergeKind)  # the tuned ensemble's mergers: linkage, relative features (`tune --linkage`)


@dataclass
class Row:
    """One line of the table: CV ARI per data set and held-out ARI where measurable."""

    label: str
    names: dict = field(default_factory=dict)  # data name -> what was run
    cv: dict = field(default_factory=dict)  # data name -> (mean, std)
    held_out: dict = field(default_factory=dict)  # data name -> ARI
    in_sample: dict = field(default_factory=dict)  # data name -> the tuned score on the images it was tuned on
    transfer: dict = field(default_factory=dict)  # data name -> ARI on the suite's transfer data for it (fitted on that data set only)
    command: str = ""


def load_suite(path: str) -> Suite:
    """Parse a suite YAML."""
    p = Path(path)
    suite = from_dict(Suite, _suite_dict(p), str(p))
    unknown = sorted(set(suite.regions_from or []) - {*suite.singles, *(load_experiment(n).name for n in suite.singles)})
    if unknown:
        raise UserError(p, f"regions_from: '{unknown[0]}' is not one of the singles ({', '.join(suite.singles)})")
    if suite.merge.problem():
        raise UserError(p, f"merge: {suite.merge.problem()}")
    stray = sorted((set(suite.extra) | set(suite.transfer)) - set(suite.datasets))
    if stray:
        raise UserError(p, f"extra/transfer: '{stray[0]}' is not one of the data sets ({', '.join(suite.datasets)})")
    return suite


def _suite_dict(p: Path, seen: tuple = ()) -> dict:
    """A suite file's keys, over those of the suite it names as `base` (a file beside it): variants as deltas."""
    if not p.is_file():
        raise UserError(p, "suite file not found")
    d = yaml.safe_load(p.read_text()) or {}
    if not isinstance(d, dict):
        raise UserError(p, "a suite file is a mapping of keys")
    base = d.pop("base", None)
    if base is None:
        return d
    parent = p.parent / f"{base}.yaml"
    if parent.resolve() in seen:
        raise UserError(p, f"'base: {base}' leads back to itself")
    return {**_suite_dict(parent, (*seen, p.resolve())), **d}


def results_file(runs: Path, suite_path: str) -> Path:
    """Where a suite's table goes: runs/results.md for the default suite, runs/results-<suite>.md for the others."""
    return Workspace(runs).results_table(Path(suite_path).stem)


def held_out_single(short: str, run: Path, data, runs: Path) -> float | None:
    """Held-out test ARI of one CV run: its fold models' test maps cached during CV for learned methods, a refit otherwise."""

    if not data.has_test_labels:
        return None
    out = Workspace(runs).results / f"{data.name}-{short}.csv"
    if has_maps(run):
        spec = single_member(f"results-{data.name}-{short}", run)
        save_ensemble(spec, runs)
        return submit_ensemble(spec.name, data, out, runs, cached=True)["test_ari"]
    # The run's own config (its fold count included), as an ensemble starting from its regions rebuilds it:
    # one fit on every annotated slice serves both.
    return submit(run_experiment(run)[0], data, out, runs=runs)["test_ari"]


def transfer_single(short: str, run: Path, data, other, runs: Path) -> float:
    """ARI on `other`'s annotated slices of one CV run's method fitted on `data`: a learned one's fold models averaged
    (as its held-out column), a non-learned one fitted on every annotated slice (its run's own config)."""

    if has_maps(run):
        spec = single_member(f"results-{data.name}-{short}", run, data=data.fingerprint())
        save_ensemble(spec, runs)
        return transfer_ensemble(spec.name, data, [other], runs)[0].mean_ari
    return transfer(run_experiment(run)[0], data, [other], runs=runs)[0].mean_ari


def run_results(suite: Suite, runs: Path, reuse: bool = False, readme: Path | None = Path("README.md"),
                out: Path | None = None) -> Path:  # fmt: skip
    """Run the suite on every data set, write `out` (default runs/results.md), and refresh the README's table."""

    t0, reused_s = time.time(), 0.0
    rows: dict[str, Row] = {}
    picks = table_picks(suite)
    names = [n for _, n in picks]
    short = {n: load_experiment(n).name for n in names}  # entries may be paths
    for ds, root in suite.datasets.items():
        data = resolve_data(root or None)
        other = resolve_data(suite.transfer[ds] or None) if ds in suite.transfer else None
        result, reused = _cv_runs(suite, ds, data, names, runs, reuse)
        reused_s += reused
        for label, name in picks:
            r = rows.setdefault(f"{label}|{name}", Row(label, command=f"make cv EXP={short[name]} FOLDS={suite.folds}"))
            r.names[ds] = f"`{short[name]}`"
            r.cv[ds] = (result[name].mean, _std(result[name].run_dir))
            r.held_out[ds] = held_out_single(short[name], result[name].run_dir, data, runs)
            if other is not None:
                r.transfer[ds] = transfer_single(short[name], result[name].run_dir, data, other, runs)
        _ensemble_row(suite, ds, data, other, result, short, runs, rows)
    _write_table(list(rows.values()), suite, (time.time() - t0) / 60, reused_s, out or Workspace(runs).results_table("results_cpu"), readme)
    return out or Workspace(runs).results_table("results_cpu")


def table_picks(suite: Suite) -> list[tuple[str, str]]:
    """The table's rows of single experiments, (label, experiment); the fg + CC row only when the suite names one."""
    fg = [("fg U-Net + connected components", suite.fg_cc)] if suite.fg_cc else []
    return [("official watershed baseline", suite.baseline), ("official baseline, contrast-stretched (auto)", suite.stretched),
            *fg, *(("single model", n) for n in suite.singles)]  # fmt: skip


def _cv_runs(suite: Suite, ds: str, data, names: list[str], runs: Path, reuse: bool) -> tuple[dict, float]:
    """Every experiment's CV run on one data set (a finished one reused if asked): the results and the reused runs' seconds."""

    extra = extra_override(suite.extra.get(ds, []))
    extra_arg = " --extra " + " ".join(suite.extra[ds]) if extra else ""
    result, reused_s = {}, 0.0
    for name in names:
        exp = load_experiment(name, extra)
        res = finished_run(exp, data, suite.folds, runs) if reuse else None
        if res is not None:
            reused_s += float(RunDir(res.run_dir).summary().get("seconds", 0.0))
        res = res or run_cv(exp, data, suite.folds, runs, command=f"python -m comp cv {name} --folds {suite.folds}" + extra_arg)
        if res is None:
            raise UserError(runs / exp.name, "folds of this run are in progress in another process: run `make results` when it is done")
        result[name] = res
        LOG.info(f"[{ds}] {name}: CV ARI {res.mean:.4f} ({res.run_dir})")
    return result, reused_s


def _merge_flags(kind: MergeKind) -> tuple[str, str]:
    """A merger kind other than the default as `tune` flags and as `make tune` variables."""
    given = [(f" --linkage {kind.linkage}", f" LINKAGE={kind.linkage}")] if kind.linkage != MergeKind().linkage else []
    given += [(" --relative-features", " RELATIVE=1")] if kind.relative else []
    given += [(" --calibrate", " CALIBRATE=1")] if kind.calibrate else []
    given += [(f" --drop-features {' '.join(kind.drop)}", f" DROP=\"{' '.join(kind.drop)}\"")] if kind.drop else []
    return "".join(flag for flag, _ in given), "".join(var for _, var in given)


def _ensemble_row(suite: Suite, ds: str, data, other, result: dict, short: dict, runs: Path, rows: dict[str, Row]) -> None:
    """Greedy selection over the learned singles, tuning (with the instance singles' regions offered), the row's figures."""

    learned = [result[n].run_dir for n in suite.singles if has_maps(result[n].run_dir)]
    ens_name = f"results-{ds}"
    spec, _ = build_ensemble(ens_name, learned, data, runs, max_steps=suite.select_steps, images=suite.select_images, force=True, command=f"python -m comp ensemble {' '.join(short[n] for n in suite.singles)} --name {ens_name}")
    instance = [n for n in suite.singles if not has_maps(result[n].run_dir) and _offers_regions(suite, n, short[n])]
    tuned_by = f"python -m comp tune {ens_name} --trials {suite.trials}" + (" --regions-from " + " ".join(str(result[n].run_dir) for n in instance) if instance else "")
    flags, make_vars = _merge_flags(suite.merge)
    tuned_by += flags
    tune(spec, OOF.load([Path(m.run) for m in spec.members], data), runs, trials=suite.trials, region_runs=[result[n].run_dir for n in instance],
         command=tuned_by, kind=suite.merge)  # fmt: skip
    spec = load_ensemble(ens_name, runs)
    regions = f' REGIONS="{" ".join(short[n] for n in instance)}"' if instance else ""
    regions += make_vars
    r = rows.setdefault("best ensemble (tuned)", Row("best ensemble (tuned)", command=f"make ensemble tune ENS=results-DATA TRIALS={suite.trials}{regions}"))
    r.cv[ds] = (spec.nested_ari if spec.nested_ari is not None else spec.oof_ari, spec.oof_std)
    r.in_sample[ds] = spec.oof_ari
    r.held_out[ds] = submit_ensemble(ens_name, data, Workspace(runs).results / f"{ds}-ensemble.csv", runs, cached=True)["test_ari"] if data.has_test_labels else None
    if other is not None:
        r.transfer[ds] = transfer_ensemble(ens_name, data, [other], runs)[0].mean_ari
    r.names[ds] = ", ".join(f"`{Path(m.run).parent.name}` x{m.weight:.2f}" for m in spec.members) + _how(spec)


def _write_table(rows: list[Row], suite: Suite, minutes: float, reused_s: float, out: Path, readme: Path | None) -> None:
    """The table with its timing line to `out`, and between the README's markers when there is a README."""
    table = _table(rows, list(suite.datasets), suite)
    m = machine()
    table += f"\nThis table took {minutes:.0f} min to regenerate on this machine ({m['cpu']}, {m['threads']} threads, torch {m['torch']} with {m['cpu_kernels']} kernels)"
    if reused_s:  # a fresh suite also trains what was reused: their own recorded times
        table += f"; it reused finished CV runs whose recorded times add {reused_s / 60:.0f} min (a fresh run: about {minutes + reused_s / 60:.0f} min)"
    table += ".\n"
    atomic_write_text(out, table)
    if readme is not None and readme.is_file():
        text = readme.read_text()
        if START in text and END in text:
            atomic_write_text(readme, re.sub(f"{re.escape(START)}.*?{re.escape(END)}", lambda _: f"{START}\n{table}{END}", text, flags=re.S))
    result(table)


def _offers_regions(suite: Suite, name: str, short: str) -> bool:
    """Whether an instance single's OOF regions are a starting point the suite's tuning tries."""
    return suite.regions_from is None or name in suite.regions_from or short in suite.regions_from


def _how(spec) -> str:
    """What the tuned ensemble does after blending, for the table."""
    if spec.regions is None:
        return " + merging" if spec.merge.enabled else ""
    start = f"`{Path(spec.regions.run).parent.name}`'s regions" if spec.regions.run else "superpixels"
    return f" + {start} merged by LightGBM" if spec.merge.enabled else f" + {start} as they are"


def _transfer_name(root: str) -> str:
    """How a transfer column names its data: the folder's name (the embedded phantom: phantom)."""
    return Path(root).name if root else "phantom"


def _std(run: Path) -> float:
    """Image std of a run's OOF ARI."""
    return RunDir(run).summary()["std_ari"]


def _table(rows: list[Row], datasets: list[str], suite: Suite) -> str:
    """Markdown table: CV ARI (mean ± image std) per data set, held-out ARI where the test labels exist."""
    to = {d: _transfer_name(suite.transfer[d]) for d in datasets if d in suite.transfer}
    head = "| | what |" + "".join(f" {d} CV ARI | {d} held-out ARI |" + (f" {d} -> {to[d]} ARI |" if d in to else "") for d in datasets)
    head += " command |\n|---|---|" + "".join("---|---|" + ("---|" if d in to else "") for d in datasets) + "---|\n"
    body = ""
    for r in rows:
        cells = ""
        for d in datasets:
            m = r.cv.get(d)
            h = r.held_out.get(d)
            extra = f" (in-sample {r.in_sample[d]:.4f})" if d in r.in_sample else ""
            cells += f" {m[0]:.4f} ± {m[1]:.4f}{extra} |" if m else " — |"
            cells += f" {h:.4f} |" if h is not None else " — |"
            if d in to:
                t = r.transfer.get(d)
                cells += f" {t:.4f} |" if t is not None else " — |"
        what = set(r.names.values())
        name = what.pop() if len(what) == 1 else "; ".join(f"{d}: {n}" for d, n in r.names.items())
        body += f"| {r.label} | {name} |{cells} `{r.command}` |\n"
    note = (f"\n{suite.folds} shared folds, seed 0; tuning: {suite.trials} Optuna trials; the ensemble's CV ARI is the nested "
            "estimate of its tuning (each fold scored with a search on the other folds; the members, chosen by greedy "
            f"selection on {suite.select_images or 'every'} OOF images, held fixed; the tuning keeps the maps' watershed, superpixels of the "
            "stretched slice or the instance-predicting singles' OOF regions, merged by fold classifiers that read the maps or "
            "not, whichever nests better), in-sample beside it; "
            "held-out = the data set's test split (learned methods: the fold models' test maps cached during CV, averaged, "
            "no TTA; the others: fitted on every annotated slice)")  # fmt: skip
    if to:
        note += ("; A -> B = fitted on A only and scored on every annotated slice of B, each calibrated on its own slices "
                 "(learned methods: the CV run's fold models averaged, no TTA; the others: fitted on every annotated slice of "
                 "A; the ensemble as selected and tuned on A)")  # fmt: skip
    return head + body + note + ".\n"
