"""One function per command: parse nothing, call the stage, print what it did.

Each command imports its stage inside the function on purpose: `comp score` or `comp validate` then starts
without torch, optuna or LightGBM, and `--help` answers at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from comp.core.atomic import writable_dir
from comp.core.errors import UserError


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
    from comp.pipeline.config import from_dict
    from comp.data.volumes import ImportConfig, import_volumes

    settings = {"window_lo": a.window[0], "window_hi": a.window[1], "every": a.every, "min_px": a.min_size, "blocks": a.blocks, "seed": a.seed,
                "window_per_slice": a.window_per_slice, "noise_hu": a.noise_hu}  # fmt: skip
    cfg = from_dict(ImportConfig, settings, "data import-volumes")  # declared ranges, checked before any volume is read
    labels = [Path(p) for p in a.labels] if a.labels else [None] * len(a.images)
    out = import_volumes([Path(p) for p in a.images], labels, Path(a.out), cfg, [Path(p) for p in a.unlabelled], a.force)
    print(f"imported into {out}/ (X_train/, Y_train.csv, groups.csv)")
    return 0


def cmd_proxy(a: argparse.Namespace) -> int:
    """Build the real-CT proxy data set."""
    from comp.pipeline.config import from_dict
    from comp.data.proxy import build_proxy
    from comp.data.volumes import ImportConfig

    settings = {"window_lo": a.window[0], "window_hi": a.window[1], "every": a.every, "window_per_slice": a.window_per_slice,
                "noise_hu": a.noise_hu}  # fmt: skip
    cfg = from_dict(ImportConfig, settings, "data proxy")
    out = build_proxy(Path(a.out), Path(a.cache), Path(a.extra) if a.extra else None, cfg, a.force)
    print(f"real-CT proxy written to {out}/")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    """Profile data sets in the challenge layout beside the challenge's published figures."""
    from comp.data.dataset import Dataset
    from comp.report.stats import data_stats, render_markdown, render_text, to_json

    profiles = [data_stats(Dataset(Path(d)), a.images, a.workers, a.superpixels) for d in a.dirs]
    print(to_json(profiles) if a.json else render_markdown(profiles) if a.markdown else "".join(map(render_text, profiles)), end="")
    return 0


def cmd_groups(a: argparse.Namespace) -> int:
    """Infer which slices come from the same scan, from the images alone; write groups.csv on request."""
    from comp.data.groups import FOV_LINK, LINK, dataset_scans, describe, write_groups
    from comp.data.dataset import Dataset

    data = Dataset(Path(a.dir))
    scans, n_train = dataset_scans(data, LINK if a.link is None else a.link, FOV_LINK if a.fov_link is None else a.fov_link)
    print(describe(data, scans, n_train), end="")
    if a.write:
        write_groups(data, scans, a.blocks, a.force)
        print(f"wrote {data.groups_file} ({a.blocks} contiguous blocks per scan are its CV groups)")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    """Validate a submission CSV against a data folder's test layout."""
    from comp.pipeline.submit import validate_submission

    s = validate_submission(a.file, a.data)
    print(f"{a.file}: valid submission for {s['images']} test images ({s['mean_regions']:.1f} regions per image)")
    if s["rows_reordered"]:
        print("  its pixel rows are in another order than Y_train.csv's: matched by label, as the official scorer does")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    """Score a prediction CSV against a truth CSV."""
    import numpy as np

    from comp.data.labels import read_label_csv, scored_maps
    from comp.core.metric import image_scores

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
    from comp.pipeline.config import extra_override, load_experiment
    from comp.pipeline.cv import run_cv

    from comp.report.leaderboard import write_leaderboard

    exp = load_experiment(a.experiment, a.set + extra_override(a.extra))
    writable_dir(a.runs, "run folders")
    if run_cv(exp, resolve_data(a.data), a.folds, Path(a.runs), command=a.command_line, only=a.fold) is not None:
        print(f"leaderboard: {write_leaderboard(Path(a.runs))}")
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    """Fit on all annotated slices, predict the test set, write and validate the CSV."""
    from comp.pipeline.config import load_experiment
    from comp.pipeline.submit import submit, submit_ensemble

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
    from comp.pipeline.config import extra_override, load_experiment
    from comp.pipeline.transfer import table, transfer, transfer_ensemble

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
    from comp.pipeline.config import check_name
    from comp.pipeline.ensemble import build_ensemble, ensemble_path
    from comp.pipeline.oof import finished_runs, latest_per_config, resolve_run
    from comp.report.leaderboard import write_leaderboard

    check_name(a.name, "--name", "ensemble name")  # before any work: the name becomes a file under runs/
    runs, data = Path(a.runs), resolve_data(a.data)
    members = [resolve_run(m, runs, data) for m in a.members] if a.members else latest_per_config(finished_runs(runs, data))
    spec, written = build_ensemble(a.name, members, data, runs, a.max_steps, a.images, a.workers, a.command_line, a.force)
    weights = ", ".join(f"{Path(m.run).parent.name}/{Path(m.run).name} x{m.weight:.2f}" for m in spec.members)
    print(f"ensemble '{spec.name}': OOF ARI {spec.oof_ari:.4f} ± {spec.oof_std:.4f} [{weights}]")
    if written:
        print(f"written: {ensemble_path(spec.name, runs)}")
    print(f"leaderboard: {write_leaderboard(runs)}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    """Optuna search of post-processing and weights on cached OOF maps; stores the best in the ensemble file."""
    from comp.pipeline.ensemble import ensemble_path, tune_target
    from comp.methods.merge import MergeKind
    from comp.pipeline.oof import resolve_run
    from comp.pipeline.tune_method import tune_spec
    from comp.report.leaderboard import write_leaderboard

    for flag, asked in (("--linkage", MergeKind(a.linkage or "classifier")), ("--drop-features", MergeKind(drop=tuple(a.drop_features or ())))):
        if asked.problem():  # before any data is read
            raise UserError(flag, asked.problem())
    runs, data = Path(a.runs), resolve_data(a.data)
    spec, single = tune_target(a.name, a.exp, runs, data, a.workers, a.command_line)
    kind = spec.merge.kind(a.linkage, a.relative_features, a.calibrate, a.drop_features)  # a re-tune without the flags keeps what is stored
    r = tune_spec(spec, single, data, runs, a.trials, a.storage, a.images, a.workers, not a.no_merge, a.seed, a.params,
                  not a.no_superpixels, [resolve_run(n, runs, data, maps=False) for n in a.regions_from or []], a.command_line, kind)
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
    from comp.report.html import report
    from comp.report.leaderboard import write_leaderboard

    runs = Path(a.runs)
    write_leaderboard(runs)
    print(f"report: {report(a.target, resolve_data(a.data), runs)}")
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    """Regenerate the README's quality table (the default suite's; another suite's table goes to runs/ only)."""
    from comp.pipeline.suite import load_suite, results_file, run_results

    out = results_file(Path(a.runs), a.suite)
    readme = None if a.no_readme or out.name != "results.md" else Path("README.md")
    run_results(load_suite(a.suite), Path(a.runs), a.reuse, readme, out)
    return 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    """Rewrite and print the leaderboard."""
    from comp.report.leaderboard import write_leaderboard

    print(write_leaderboard(Path(a.runs)).read_text())
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    """Self-supervised pretraining of an encoder on every training slice's pixels (no labels)."""
    from comp.pipeline.pretrain import load_ssl_config, run_pretrain

    cfg = load_ssl_config(a.experiment)
    data = resolve_data(a.data)
    # Unlabelled slices and the annotated slices' pixels alike: no label is ever read here.
    path = run_pretrain(cfg, data.x_train, data.fingerprint()["y_train"], Path(a.runs))
    print(f"encoder checkpoint: {path} (set model.encoder_weights to it in a segmentation experiment)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the benchmark suite."""
    from comp.bench.timings import bench_gpu, bench_quantisation, run_bench

    if a.gpu:
        bench_gpu(dry_run=a.dry_run, steps=a.steps, out=Path(a.out if a.out != "bench.json" else "bench_gpu.json"))
        return 0

    if a.quantisation:  # the effect of uint8 map caching on finished runs (older runs cached float16 maps)
        from comp.pipeline.oof import resolve_run

        data = resolve_data(a.data)
        bench_quantisation([resolve_run(r, Path(a.runs), data) for r in a.quantisation], data)
        return 0
    run_bench(quick=a.quick, out=Path(a.out))
    return 0
