"""Argument types and the options several commands share."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from comp.data.contrast import PER_SLICE_EXAMPLE, window_ranges_problem
from comp.pipeline.workspace import RUNS


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit code 2), like every other user error, and takes
    -q / -v wherever they are written (before or after the command)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser leaves a count given before the command alone
        self.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                          help="results and warnings only, no progress bars (-qq: warnings only)")
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="details too (every threshold scanned)")

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


def noise_arg(parser: argparse.ArgumentParser, default: float = 0.0) -> None:
    """--noise-hu SD, shared by the commands that import volumes."""
    parser.add_argument("--noise-hu", type=at_least(0.0, float), default=default, metavar="SD",
                        help="Gaussian noise (sd, HU) added inside every slice's scanned field before windowing, seeded and the same in every "
                             f"rendering: a smooth scan made as noisy as a native one (default {default:g})")  # fmt: skip


def runs_folder(text: str) -> str:
    """An argparse type: the runs folder, which may not exist yet but may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file, not a runs folder")
    return text


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
