"""CV runs' out-of-fold maps: finding finished runs, loading their cached maps, scoring blends of them image by image."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from comp.core.errors import UserError
from comp.core.metric import image_score
from comp.core.parallel import pmap
from comp.core.store import MapArray
from comp.data.dataset import Dataset
from comp.methods.compose import segment
from comp.methods.merge import Merger
from comp.nets.targets import PostParams, blend
from comp.pipeline.config import check_name, experiment_from_dict, from_dict
from comp.pipeline.workspace import RunDir
from comp.regions.superpixels import Regions, superpixels


@dataclass
class RunMaps:
    """A finished CV run's cached OOF maps, in fold order, with what produced them."""

    run: Path
    ids: np.ndarray  # X_train indices of the OOF images
    folds: np.ndarray  # fold of each
    maps: Sequence[np.ndarray]  # per OOF image: (C, r, r) float32 (a MapArray, or a list/array in tests)
    post: PostParams
    config: dict

    @property
    def label(self) -> str:
        """experiment/run-id, as shown in tables."""
        return RunDir(self.run).label

    @property
    def channels(self) -> int:
        """Map channels (3 probabilities, then the embedding)."""
        return int(np.shape(self.maps[0])[0])


class _Concat:
    """Several folds' MapArrays read as one sequence of per-image maps (nothing decoded until asked)."""

    def __init__(self, parts: list[MapArray]) -> None:
        self.parts, self.offsets = parts, np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.parts[f][int(i - self.offsets[f])]


def load_run_maps(run: Path) -> RunMaps:
    """A CV run's OOF maps (memory-mapped, decoded per image); a run without cached maps is a clear error."""
    rd = RunDir(Path(run))
    config = run_config(rd.path)
    ids, folds = rd.oof_index()
    parts = []
    for f in range(rd.n_folds):
        if not rd.oof_maps_file(f).is_file():
            raise UserError(rd.path, f"no cached OOF maps ({rd.oof_maps_file(f).name}): only map-predicting methods can be ensembled")
        parts.append(rd.oof_maps(f))
    return RunMaps(rd.path, ids, folds, _Concat(parts), post_of(rd.path, config), config)


def run_config(run: Path) -> dict:
    """A finished CV run's config.yaml; an unfinished run is a clear error."""
    rd = RunDir(Path(run))
    rd.summary()  # raises for an unfinished run
    return rd.config()


def post_of(run: Path, config: dict) -> PostParams:
    """The post-processing a run's config.yaml asks for."""
    return from_dict(PostParams, config.get("params", {}).get("post", {}), str(RunDir(Path(run)).config_file), "params.post")


def has_maps(run: Path) -> bool:
    """Whether a CV run cached OOF maps (a map-predicting method) or only instance maps (a non-learned one)."""
    return RunDir(Path(run)).has_maps


def finished_runs(runs: Path, data: Dataset, maps: bool = True) -> list[Path]:
    """Finished CV runs on this data set (same labels), newest first; with `maps`, only those that cached OOF maps."""
    want = data.fingerprint()["y_train"]
    found = [r.path for r in RunDir.finished_under(runs) if r.summary().get("dataset", {}).get("y_train") == want and (r.has_maps or not maps)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def resolve_run(name: str, runs: Path, data: Dataset, maps: bool = True) -> Path:
    """A run folder, or an experiment name meaning its newest finished run (with maps, if asked) on this data set."""
    if Path(name).is_dir():
        if not RunDir(Path(name)).config_file.is_file():
            raise UserError(name, "a folder, but not a CV run folder (no config.yaml)")
        return Path(name)
    if name.endswith(".yaml") and Path(name).is_file():  # an experiment file: its runs lie under its stem
        stem = Path(name).stem
    else:
        stem = check_name(name, name, "experiment name")  # `../x` names no experiment
    matches = [r for r in finished_runs(runs, data, maps) if r.parent.name == stem]
    if not matches:
        if maps and any(r.parent.name == stem for r in finished_runs(runs, data, maps=False)):
            raise UserError(name, f"its finished CV runs cache no maps (a method that predicts regions, not maps): only map-predicting "
                            f"runs are ensembled; `comp tune {stem}` tunes its own settings, `--regions-from {stem}` merges from its regions")  # fmt: skip
        what = "finished CV run with cached maps" if maps else "finished CV run"
        raise UserError(name, f"no {what} on data '{data.name}' under {runs}/{stem}/ (run `comp cv {stem}` first)")
    return matches[0]


def latest_per_config(runs: list[Path]) -> list[Path]:
    """The newest run of each (experiment, config digest), among runs with the most common fold count."""
    if not runs:
        return []
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


def oof_index(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """X_train indices of a finished run's OOF images, in fold order, and the fold of each (each file read once)."""
    run_config(run)  # a clear error for an unfinished run
    return RunDir(Path(run)).oof_index()


def random_subset(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to n of n_total items drawn at random (seeded, so deterministic), in order (n <= 0: all)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def run_experiment(run: Path, overrides: dict | None = None):
    """A finished run's experiment with tuned `overrides` (dotted keys) applied, and its resolved contrast."""

    cfg = run_config(run)
    sets = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    exp = experiment_from_dict(cfg, RunDir(Path(run)).config_file, sets, ignore=("data", "contrast_resolved"))
    resolved = RunDir.contrast_of(cfg)
    if "contrast.window" in (overrides or {}):  # a tuned window is given in grey levels
        resolved = resolved.with_window(overrides["contrast.window"])
    return exp, resolved


def check_aligned(members: Sequence[RunMaps]) -> None:
    """Members must share the same OOF images and folds, or blending them would mix folds."""
    first = members[0]
    for m in members[1:]:
        if not (np.array_equal(m.ids, first.ids) and np.array_equal(m.folds, first.folds)):
            raise UserError(m.run, f"folds differ from {first.run}: ensemble members need the same cv.folds, cv.seed and data")


def _score_item(i: int, oof: "OOF", which: Sequence[int], weights: Sequence[float], post: PostParams, merger: Merger | None,
                regions: Regions | None = None) -> float:  # fmt: skip
    """ARI of OOF image i under the given weights, post-processing (or superpixels) and merger (maps decoded in the worker)."""
    maps, image, truth, fold = oof.item(i, which)
    return image_score(truth, segment(blend(maps, weights), image, post, merger, fold, regions, oof.given(i, regions)))


def _superpixels(image: np.ndarray, regions: Regions) -> np.ndarray:
    """The superpixels of one OOF slice behind the regions' window (a pool job), as uint16 where they fit."""
    sp = superpixels(regions.stretch(image), regions.superpixels)
    return sp.astype(np.uint16) if sp.max() < 2**16 else sp


@dataclass
class OOF:
    """Aligned members' OOF maps with the matching slices and truths, for repeated scoring."""

    members: list[RunMaps]
    images: np.ndarray
    truths: np.ndarray
    runs_labels: dict = field(default_factory=dict)  # run -> its OOF instance predictions, aligned with these images
    made: dict = field(default_factory=dict)  # superpixel Regions (their repr) -> every OOF image's superpixels, made once

    @classmethod
    def load(cls, runs: Sequence[Path], data: Dataset) -> "OOF":
        """Load and align members; truths and slices come from the data set."""
        members = [load_run_maps(r) for r in runs]
        check_aligned(members)
        ids = members[0].ids
        # Calibrated per slice, the members read the slices re-rendered through the reference window: so do the
        # post-processor and the merger, and every window found on them is in those grey levels.
        return cls(members, RunDir.contrast_of(members[0].config).canonical(data.x_train[ids]), data.y_train[ids])

    @property
    def folds(self) -> np.ndarray:
        """Fold of each OOF image."""
        return self.members[0].folds

    def subset(self, n: int, seed: int = 0) -> np.ndarray:
        """Indices of up to n OOF images drawn at random (seeded, so deterministic), in order (0 = all)."""
        return random_subset(len(self.images), n, seed)

    def item(self, i: int, which: Sequence[int]) -> tuple:
        """(chosen members' maps, slice, truth, fold) of OOF image i."""
        return tuple(self.members[j].maps[i] for j in which), self.images[i], self.truths[i], int(self.folds[i])

    def scores(
        self,
        weights: Sequence[float],
        post: PostParams,
        merger: Merger | None = None,
        idx: np.ndarray | None = None,
        workers: int = 0,
        desc: str | None = None,
        regions: Regions | None = None,
    ) -> np.ndarray:
        """Per-image OOF ARI of the weighted blend (members with weight 0 are not even loaded into workers)."""
        idx = np.arange(len(self.images)) if idx is None else idx
        which = [j for j, w in enumerate(weights) if w > 0]
        if not which:
            raise UserError("weights", "every ensemble weight is 0")
        w = [weights[j] for j in which]
        self.given(0, regions)  # a run's regions are loaded here, before the workers fork
        # Only indices cross to the (forked) workers: each decodes its image's maps from the shared mapping.
        return np.array(pmap(_score_item, [int(i) for i in idx], self, which, w, post, merger, regions, workers=workers, desc=desc))

    def run_labels(self, run: str) -> np.ndarray:
        """A CV run's own OOF predictions of these images (loaded once); its folds must be the members'."""
        if run not in self.runs_labels:
            rd = self.check_run(run)
            self.runs_labels[run] = np.concatenate([rd.fold_pack(f)["pred"] for f in range(rd.n_folds)])
        return self.runs_labels[run]

    def check_run(self, run: str | Path) -> RunDir:
        """A finished CV run whose OOF images and folds are the members' (cheap: its fold index only), else a clear error."""
        rd = RunDir(Path(run))
        rd.summary()  # a clear error for an unfinished run
        ids, folds = rd.oof_index()  # runs on the same folds list their OOF images alike (as check_aligned asks of members)
        if not (np.array_equal(ids, self.members[0].ids) and np.array_equal(folds, self.folds)):
            raise UserError(rd.path, f"its folds differ from {self.members[0].run}: its regions would come from models that saw the images they split")
        return rd

    def given(self, i: int, regions: Regions | None) -> np.ndarray | None:
        """The regions a merger starts from on OOF image i when they are a run's predictions, or superpixels made once
        for every image (make_superpixels); None: the maps' watershed, or superpixels made on each call."""
        if regions is None:
            return None
        if regions.run:
            return self.run_labels(regions.run)[i]
        made = self.made.get(repr(regions))
        return None if made is None else made[i]

    def make_superpixels(self, regions: Regions, workers: int = 0) -> None:
        """Make every OOF image's superpixels of `regions` once (in the parent, before workers fork), so that scoring
        them at several merge thresholds and fitting their merger never make them again."""
        if regions.run or repr(regions) in self.made:
            return
        self.made[repr(regions)] = np.stack(pmap(_superpixels, list(self.images), regions, workers=workers, desc="superpixels"))

    def window(self) -> list[float]:
        """The members' resolved grey window, in the grey levels of `images` (the first member's; learned runs on one data
        set share it)."""
        return list(RunDir.contrast_of(self.members[0].config).window)
