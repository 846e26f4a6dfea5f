"""The run folder: one type owns a CV run's layout (config, folds, per-fold work, OOF and test maps, scores).

    runs/<experiment>/<YYYYmmdd-HHMMSS>-<config digest>-<labels fingerprint>-k<folds>/
        config.yaml  folds.csv  oof_scores.csv  cv.json (written last: the run is finished)
        fold<k>/            the method's work for fold k (checkpoints, history.json, fold.json)
        oof/fold<k>.npz     ids, instance predictions and scores of fold k's held-out images
        oof/fold<k>_maps.npy (+ _maps_scale.npy)   their cached maps, uint8-quantised
        test/fold<k>_maps.npy (+ _maps_scale.npy)  the test slices' maps of fold k's model
        pseudo/fold<k>-<tag>.npz   unlabelled training slices labelled by fold k's model (as a teacher;
                                   fold "all": every fold's model, for a fit on every annotated slice)
    runs/<experiment>/submit-<config digest>-<labels fingerprint>/   the fit on every annotated slice
    runs/<experiment>/transfer-<config digest>-<fit labels>-to-<scored labels>.json   a transfer's scores

Cached maps are stored as uint8 with a float32 offset and step per image and channel: a quarter of
float32 and half of float16, within half a step (<= 0.2% of a channel's range in that image) of the
values. Files written before that (plain float16) still load.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

from comp.errors import UserError, atomic_path, atomic_save_npy, atomic_write_text

RUNS = Path("runs")
SUMMARY = "cv.json"


class MapArray:
    """Cached (N, C, r, r) maps, quantised or not; indexing decodes to float32, the file stays memory-mapped."""

    def __init__(self, values: np.ndarray, scale: np.ndarray | None = None) -> None:
        self.values, self.scale = values, scale  # scale: (N, C, 2) float32 offset and step, None for float maps

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, r, r)."""
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[np.ndarray]:
        """One image's decoded maps at a time."""
        return (self[i] for i in range(len(self)))

    def first_channels(self, k: int) -> "MapArray":
        """The same maps cut to their first k channels, still lazy (memory-mapped views, nothing decoded)."""
        return MapArray(self.values[:, :k], None if self.scale is None else self.scale[:, :k])

    def __getitem__(self, i: int | slice | np.ndarray) -> np.ndarray:
        """Maps of one image (C, r, r) or of several (n, C, r, r), as float32."""
        v = np.asarray(self.values[i], np.float32)
        if self.scale is None:
            return v
        s = self.scale[i]
        return v * s[..., 1, None, None] + s[..., 0, None, None]


def quantise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, r, r) float maps -> uint8 codes and (N, C, 2) float32 [offset, step] per image and channel.

    One float32 copy, every step in place on it; NaN and infinities (a channel whose min or max is not finite) are
    zeroed/clamped only in the channels that have them: about half the time of a whole-array nan_to_num and fresh
    arrays per step, with the same codes (`make bench` times both)."""
    m = np.array(maps, np.float32)
    lo, hi = m.min(axis=(2, 3)), m.max(axis=(2, 3))
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        m[bad] = np.nan_to_num(m[bad])
        lo, hi = m.min(axis=(2, 3)), m.max(axis=(2, 3))
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    np.subtract(m, lo[..., None, None], out=m)
    np.divide(m, step[..., None, None], out=m)
    np.rint(m, out=m)
    np.clip(m, 0, 255, out=m)
    return m.astype(np.uint8), np.stack([lo, step], -1).astype(np.float32)


def _scale_path(path: Path) -> Path:
    """fold0_maps.npy -> fold0_maps_scale.npy."""
    return path.with_name(path.stem + "_scale.npy")


def save_maps(path: Path, maps: np.ndarray) -> None:
    """Write maps quantised (the scale file first: the maps file's presence means both are complete)."""
    codes, scale = quantise(maps)
    atomic_save_npy(_scale_path(path), scale)
    atomic_save_npy(path, codes)


def write_maps(path: Path, n: int, predict: Callable[[slice], np.ndarray], chunk: int = 64) -> None:
    """Predict n slices a chunk at a time straight into a quantised maps file: memory independent of n."""
    from tqdm import tqdm

    scale, codes = None, None
    with atomic_path(path, suffix=".npy") as tmp:
        for c0 in tqdm(range(0, n, chunk), desc=f"maps -> {path.name}", leave=False, disable=n <= chunk):
            sl = slice(c0, min(n, c0 + chunk))
            q, s = quantise(predict(sl))
            if codes is None:
                codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *q.shape[1:]))
                scale = np.empty((n, *s.shape[1:]), np.float32)
            codes[sl], scale[sl] = q, s
        if codes is None:
            raise UserError(path, "no slices to predict")
        codes.flush()
        del codes
        atomic_save_npy(_scale_path(path), scale)


def load_maps(path: Path) -> MapArray:
    """A cached maps file, memory-mapped (forked workers share its pages)."""
    values = np.load(path, mmap_mode="r")
    scale_file = _scale_path(path)
    if values.dtype == np.uint8:
        if not scale_file.is_file():
            raise UserError(scale_file, "missing: the quantised maps beside it cannot be read")
        return MapArray(values, np.load(scale_file))
    return MapArray(values)


@dataclass(frozen=True)
class FoldDir:
    """A fold's work folder (a CV fold, a fit on every annotated slice, or a pretraining): what is kept there."""

    path: Path

    @property
    def last(self) -> Path:
        """The full training checkpoint a killed fold resumes from."""
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        """The selected epoch's weights: what a trained fold predicts with."""
        return self.path / "best.pt"

    @property
    def history(self) -> Path:
        """Per-epoch losses and validation scores (the report's curves)."""
        return self.path / "history.json"

    @property
    def merger(self) -> Path:
        """A hybrid's fitted region merger."""
        return self.path / "merge.txt"


@dataclass(frozen=True)
class Workspace:
    """Everything under a runs folder beside the CV runs: ensembles, tuning studies, pretraining, suites' tables and
    held-out files, reports, the leaderboard. The one place those paths are spelled."""

    root: Path = RUNS

    @property
    def ensembles(self) -> Path:
        """Ensemble files (NAME.yaml) and their test-set mergers (NAME.merge.txt)."""
        return Path(self.root) / "ensembles"

    @property
    def tune(self) -> Path:
        """SQLite tuning studies (NAME.db)."""
        return Path(self.root) / "tune"

    def pretrain_dir(self, name: str, digest: str) -> Path:
        """One pretraining's folder (config and data digest)."""
        return Path(self.root) / "pretrain" / name / digest

    def pretrained(self, name: str) -> Path:
        """The published encoder checkpoint of a pretraining experiment (what YAMLs point at)."""
        return Path(self.root) / "pretrain" / f"{name}.pt"

    def report(self, label: str) -> Path:
        """An HTML report's folder."""
        return Path(self.root) / "report" / label

    @property
    def results(self) -> Path:
        """The results suites' held-out submissions."""
        return Path(self.root) / "results"

    def results_table(self, suite: str) -> Path:
        """A suite's table: results.md for the default suite (results_cpu), results-<suite>.md for the others."""
        return Path(self.root) / ("results.md" if suite == "results_cpu" else f"results-{suite}.md")

    @property
    def leaderboard(self) -> Path:
        """Every CV run and ensemble, ranked."""
        return Path(self.root) / "leaderboard.md"


@dataclass(frozen=True)
class RunKey:
    """What identifies a run of an experiment: config digest, labels fingerprint (6 hex), fold count."""

    digest: str
    labels: str
    folds: int

    def __str__(self) -> str:
        return f"{self.digest}-{self.labels}-k{self.folds}"


@dataclass(frozen=True)
class RunDir:
    """A CV run folder; every path inside one is spelled here and only here."""

    path: Path

    # ------------------------------------------------------------------ naming and lookup
    @property
    def experiment(self) -> str:
        """The experiment's name (the parent folder)."""
        return self.path.parent.name

    @property
    def label(self) -> str:
        """experiment/run-id, as shown in tables."""
        return f"{self.experiment}/{self.path.name}"

    @property
    def key(self) -> RunKey | None:
        """The run's key parsed from its folder name (None for a folder not named by `create`)."""
        parts = self.path.name.split("-")
        if len(parts) != 5 or not parts[4].startswith("k") or not parts[4][1:].isdigit():
            return None
        return RunKey(parts[2], parts[3], int(parts[4][1:]))

    @classmethod
    def of_experiment(cls, runs: Path, experiment: str, key: RunKey) -> list["RunDir"]:
        """Every run folder of this experiment and key, newest first."""
        base = Path(runs) / experiment
        if not base.is_dir():
            return []
        return [cls(d) for d in sorted(base.iterdir(), reverse=True) if d.is_dir() and d.name.endswith(f"-{key}")]

    @classmethod
    def create(cls, runs: Path, experiment: str, key: RunKey) -> "RunDir":
        """Reuse an unfinished run of the same key (resume), else make a new run id."""
        for run in cls.of_experiment(runs, experiment, key):
            if not run.finished:
                return run
        while True:  # run ids are one per second: a rerun within the same second waits for the next one
            new = Path(runs) / experiment / f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{key}"
            if not new.exists():
                return cls(new)
            time.sleep(0.2)

    @classmethod
    def finished_under(cls, runs: Path) -> Iterator["RunDir"]:
        """Every finished run folder under a runs folder; one whose summary cannot be read is named and skipped."""
        for summary in sorted(Path(runs).glob(f"*/*/{SUMMARY}")):
            run = cls(summary.parent)
            try:
                run.summary()
            except UserError as e:  # a truncated cv.json must not take every table and selection down with it
                print(f"skipped {e}", file=sys.stderr, flush=True)
                continue
            yield run

    @staticmethod
    def lock_file(runs: Path, experiment: str, key: RunKey) -> Path:
        """The lock of a run key (beside its run folders: it exists before the folder is chosen)."""
        return Path(runs) / experiment / f".{key}.lock"

    @staticmethod
    def submit_workdir(runs: Path, experiment: str, digest: str, labels: str) -> Path:
        """Where `submit` fits a method on every annotated slice (keyed like runs: config and data)."""
        return Path(runs) / experiment / f"submit-{digest}-{labels}"

    @staticmethod
    def submit_predictions(workdir: Path) -> Path:
        """A fit-on-every-slice's X_test predictions, kept for reuse (an ensemble that starts from them)."""
        return Path(workdir) / "test_pred.npz"

    # ------------------------------------------------------------------ files
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def folds_file(self) -> Path:
        return self.path / "folds.csv"

    @property
    def scores_file(self) -> Path:
        return self.path / "oof_scores.csv"

    def fold_dir(self, fold: int) -> Path:
        """The method's work folder of one fold (FoldDir names what is kept there)."""
        return self.path / f"fold{fold}"

    def claim_file(self, fold: int) -> Path:
        """Held (pid@host) by the process training a fold: other processes take another fold."""
        return self.fold_dir(fold) / ".claim"

    def oof_file(self, fold: int) -> Path:
        """ids, predictions and scores of a fold's held-out images (its presence: the fold is done)."""
        return self.path / "oof" / f"fold{fold}.npz"

    def oof_maps_file(self, fold: int) -> Path:
        return self.path / "oof" / f"fold{fold}_maps.npy"

    def test_maps_file(self, fold: int) -> Path:
        return self.path / "test" / f"fold{fold}_maps.npy"

    def pseudo_file(self, fold: int | None, tag: str) -> Path:
        """Pseudo-labels this run's fold model (None: all its fold models) made, for selection settings `tag`."""
        return self.path / "pseudo" / f"fold{'all' if fold is None else fold}-{tag}.npz"

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        """Whether the run was summarised (every fold done)."""
        return self.summary_file.is_file()

    @property
    def has_maps(self) -> bool:
        """Whether the run cached OOF maps (a map-predicting method) or only instance maps (a non-learned one)."""
        return self.oof_maps_file(0).is_file()

    def fold_done(self, fold: int) -> bool:
        return self.oof_file(fold).is_file()

    def config(self) -> dict:
        """The run's config.yaml."""
        if not self.config_file.is_file():
            raise UserError(self.path, "not a run folder (no config.yaml)")
        return yaml.safe_load(self.config_file.read_text())

    def summary(self) -> dict:
        """cv.json; an unfinished run is a clear error."""
        if not self.finished:
            raise UserError(self.path, f"not a finished CV run (no {SUMMARY})")
        try:
            summary = json.loads(self.summary_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary = None
        if not isinstance(summary, dict):
            raise UserError(self.summary_file, "not a readable run summary (truncated by a crash or a full disk?): delete it "
                            "and rerun `comp cv` with the same settings to summarise the finished folds again")  # fmt: skip
        return summary

    @property
    def n_folds(self) -> int:
        return int(self.config()["cv"]["folds"])

    # ------------------------------------------------------------------ writing
    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_file, yaml.safe_dump(config, sort_keys=False))

    def write_folds(self, names: list[str], ids: np.ndarray, fold_of: np.ndarray) -> None:
        atomic_write_text(self.folds_file, "image,index,fold\n" + "".join(f"{names[i]},{i},{f}\n" for i, f in zip(ids, fold_of)))

    def write_fold(self, fold: int, ids: np.ndarray, pred: np.ndarray, scores: np.ndarray, info: dict) -> None:
        """A fold's OOF pack and fold.json (the pack last: it marks the fold done)."""
        atomic_write_text(self.fold_dir(fold) / "fold.json", json.dumps(info, indent=1))
        with atomic_path(self.oof_file(fold), suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=ids, pred=pred, scores=scores)

    def write_scores(self, rows: list[tuple[str, int, float]]) -> None:
        atomic_write_text(self.scores_file, "image,fold,ari\n" + "".join(f"{n},{f},{s:.6f}\n" for n, f, s in rows))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=1))

    # ------------------------------------------------------------------ reading
    def fold_pack(self, fold: int) -> dict[str, np.ndarray]:
        """ids, pred and scores of one fold."""
        with np.load(self.oof_file(fold)) as z:
            return {k: z[k] for k in z.files}

    def oof_index(self) -> tuple[np.ndarray, np.ndarray]:
        """X_train indices of the OOF images, in fold order, and the fold of each (each file read once)."""
        ids = []
        for f in range(self.n_folds):
            with np.load(self.oof_file(f)) as z:
                ids.append(z["ids"])
        return np.concatenate(ids), np.concatenate([np.full(len(i), f) for f, i in enumerate(ids)])

    def folds(self) -> tuple[np.ndarray, np.ndarray]:
        """X_train indices of the annotated images and the fold of each, as folds.csv fixed them when the run began."""
        if not self.folds_file.is_file():
            raise UserError(self.path, "not a run folder (no folds.csv)")
        rows = np.loadtxt(self.folds_file, delimiter=",", skiprows=1, usecols=(1, 2), dtype=np.int64, ndmin=2)
        return rows[:, 0], rows[:, 1]

    @staticmethod
    def contrast_of(config: dict):
        """The contrast step a run resolved on its data set, from its config (as cv writes it)."""
        from comp.contrast import Contrast

        return Contrast.from_dict(config.get("contrast_resolved"))

    def fold_model(self, fold: int):
        """The trained model of one fold, rebuilt from config.yaml behind the run's resolved contrast."""
        from comp.config import from_dict
        from comp.registry import get_method

        cfg = self.config()
        spec = get_method(cfg["method"], self.config_file)
        method = spec.build(from_dict(spec.params, cfg["params"], str(self.config_file), "params"))
        if not hasattr(method, "load"):
            raise UserError(self.path, f"method '{cfg['method']}' keeps no fold models to load")
        method.load(self.fold_dir(fold), self.contrast_of(cfg))
        return method

    def oof_maps(self, fold: int) -> MapArray:
        return load_maps(self.oof_maps_file(fold))

    def test_maps(self, fold: int) -> MapArray:
        return load_maps(self.test_maps_file(fold))

    def fold_infos(self) -> list[dict]:
        """Each finished fold's fold.json, in fold order."""
        return [json.loads(p.read_text()) for p in sorted(self.path.glob("fold*/fold.json"))]

    def histories(self) -> dict[str, list[dict]]:
        """Training histories of the folds that kept one, by fold folder name."""
        return {p.parent.name: json.loads(p.read_text()) for p in sorted(self.path.glob("fold*/history.json"))}


@dataclass(frozen=True)
class TransferRecord:
    """One transfer's record (an experiment fitted on one data set, scored on another): a single JSON file."""

    path: Path

    @classmethod
    def of(cls, runs: Path, experiment: str, digest: str, fit_labels: str, score_labels: str) -> "TransferRecord":
        """The record of this config fitted on `fit_labels`' data and scored on `score_labels`'."""
        return cls(Path(runs) / experiment / f"transfer-{digest}-{fit_labels}-to-{score_labels}.json")

    def read(self) -> dict | None:
        """The record, or None when there is none."""
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    @classmethod
    def all_under(cls, runs: Path) -> Iterator[dict]:
        """Every readable transfer record under `runs` (experiments' and ensembles'); a broken one is named and skipped."""
        for path in sorted(Path(runs).glob("*/transfer-*.json")):
            try:
                yield {**json.loads(path.read_text()), "path": str(path)}
            except (OSError, ValueError) as e:
                print(f"skipped {path}: {e}", file=sys.stderr, flush=True)

    def write(self, record: dict) -> None:
        """Write it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(record, indent=1))
