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

Beside it, `Workspace` owns every other folder under runs/ (ensembles, tuning studies, pretraining, suites,
reports, the leaderboard); a fold's own folder and the map files are core.store's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

from comp.core.atomic import atomic_path, atomic_write_text
from comp.core.errors import UserError
from comp.core.log import LOG
from comp.core.store import MapArray, load_maps
from comp.data.contrast import Contrast
from comp.methods.registry import get_method
from comp.pipeline.config import from_dict


RUNS = Path("runs")
SUMMARY = "cv.json"


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
                LOG.warning(f"skipped {e}")
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

        return Contrast.from_dict(config.get("contrast_resolved"))

    def fold_model(self, fold: int):
        """The trained model of one fold, rebuilt from config.yaml behind the run's resolved contrast."""

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
                LOG.warning(f"skipped {path}: {e}")

    def write(self, record: dict) -> None:
        """Write it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(record, indent=1))
