"""OOF ensembles: members' cached maps, blending, scoring, greedy forward selection and the ensemble file.

An ensemble file (runs/ensembles/NAME.yaml) names its member CV runs with weights, the post-processing
parameters and the region-merging setting; `comp tune` improves it, `comp submit --ensemble` uses it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from comp.config import check_name, from_dict
from comp.errors import UserError, atomic_write_text
from comp.fields import bounded
from comp.io import Dataset
from comp.merge import Merger
from comp.metric import group_means, image_score
from comp.parallel import pmap
from comp.postprocess import PostParams, Regions, blend, segment
from comp.rundir import MapArray, RunDir, Workspace


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
    config = _run_config(rd.path)
    ids, folds = rd.oof_index()
    parts = []
    for f in range(rd.n_folds):
        if not rd.oof_maps_file(f).is_file():
            raise UserError(rd.path, f"no cached OOF maps ({rd.oof_maps_file(f).name}): only map-predicting methods can be ensembled")
        parts.append(rd.oof_maps(f))
    return RunMaps(rd.path, ids, folds, _Concat(parts), _post_of(rd.path, config), config)


def _run_config(run: Path) -> dict:
    """A finished CV run's config.yaml; an unfinished run is a clear error."""
    rd = RunDir(Path(run))
    rd.summary()  # raises for an unfinished run
    return rd.config()


def _post_of(run: Path, config: dict) -> PostParams:
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


def oof_index(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """X_train indices of a finished run's OOF images, in fold order, and the fold of each (each file read once)."""
    _run_config(run)  # a clear error for an unfinished run
    return RunDir(Path(run)).oof_index()


def random_subset(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to n of n_total items drawn at random (seeded, so deterministic), in order (n <= 0: all)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def run_experiment(run: Path, overrides: dict | None = None):
    """A finished run's experiment with tuned `overrides` (dotted keys) applied, and its resolved contrast."""
    from comp.config import experiment_from_dict

    cfg = _run_config(run)
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


@dataclass
class OOF:
    """Aligned members' OOF maps with the matching slices and truths, for repeated scoring."""

    members: list[RunMaps]
    images: np.ndarray
    truths: np.ndarray
    runs_labels: dict = field(default_factory=dict)  # run -> its OOF instance predictions, aligned with these images

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
        """The regions a merger starts from on OOF image i when they are a run's predictions (None: superpixels or maps)."""
        return self.run_labels(regions.run)[i] if regions is not None and regions.run else None

    def window(self) -> list[float]:
        """The members' resolved grey window, in the grey levels of `images` (the first member's; learned runs on one data
        set share it)."""
        return list(RunDir.contrast_of(self.members[0].config).window)


def nested_scores(folds: np.ndarray, idx: np.ndarray, search: Callable[[np.ndarray], object],
                  score: Callable[[object, np.ndarray], np.ndarray]) -> np.ndarray:  # fmt: skip
    """Per-image scores of `idx` where each fold's images are scored with what `search` found on the other folds'."""
    out = np.full(len(folds), np.nan)
    for k in np.unique(folds[idx]):
        held, inner = idx[folds[idx] == k], idx[folds[idx] != k]
        out[held] = score(search(inner), held)
    return out[idx]


def gain_and_se(new: np.ndarray, old: np.ndarray, keys: np.ndarray) -> tuple[float, float]:
    """Mean per-image gain of `new` over `old` scores, and the standard error of the per-group (fold or scan) mean
    gains: a more fitted candidate is kept only when its gain exceeds that spread (the one-standard-error rule)."""
    d = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    return float(d.mean()), group_means(d, keys)[2]


def greedy_select(oof: OOF, post: PostParams, max_steps: int = 8, idx=None, workers: int = 0, verbose: bool = True) -> tuple[list[int], list[dict]]:
    """Greedy forward selection with replacement by mean OOF ARI; returns member counts and the path taken.

    The first step takes the best single; every later addition must gain more than the standard error of its
    per-fold gains, else the simpler ensemble is kept (one-standard-error rule)."""
    counts = [0] * len(oof.members)
    keys = oof.folds if idx is None else oof.folds[idx]
    best, current, path = -np.inf, None, []
    for step in range(max_steps):
        trial = []
        for j in range(len(oof.members)):
            c = counts.copy()
            c[j] += 1
            per_image = oof.scores(c, post, idx=idx, workers=workers)
            trial.append((float(per_image.mean()), j, per_image))
        score, j, per_image = max(trial, key=lambda t: (t[0], t[1]))
        if score <= best + 1e-6:
            break
        if current is not None:
            gain, se = gain_and_se(per_image, current, keys)
            if gain <= se:
                if verbose:
                    print(f"step {step + 1}: + {oof.members[j].label} would gain {gain:.4f}, within its per-fold standard error "
                          f"{se:.4f}: the simpler ensemble is kept", flush=True)  # fmt: skip
                break
        counts[j] += 1
        best, current = score, per_image
        path.append({"step": step + 1, "added": oof.members[j].label, "oof_ari": round(score, 6)})
        if verbose:
            print(f"step {step + 1}: + {oof.members[j].label} -> OOF ARI {score:.4f}", flush=True)
    return counts, path


@dataclass
class MemberRef:
    """One ensemble member: a CV run folder and its weight."""

    run: str = ""
    weight: float = bounded(1.0, lo=0)


@dataclass
class MergeSpec:
    """Learned region merging: on or off, and the probability threshold."""

    enabled: bool = False
    threshold: float = bounded(0.5, lo=0, hi=1)


@dataclass
class EnsembleSpec:
    """What `submit --ensemble` reproduces: members, weights, post-processing, merging, and the OOF score."""

    name: str = "default"
    members: list[MemberRef] = field(default_factory=list)
    post: PostParams = field(default_factory=PostParams)
    merge: MergeSpec = field(default_factory=MergeSpec)
    # The hybrid: merging starts from superpixels of the stretched slice instead of the post-processed maps.
    regions: Regions | None = None
    oof_ari: float | None = None
    oof_std: float | None = None
    oof_ari_no_merge: float | None = None
    nested_ari: float | None = None  # honest: each fold scored with what a search found on the other folds
    data: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    command: str = ""  # what selected it (or, for a tuned experiment, the tune that made it)
    tune_command: str = ""  # the tune call whose settings are stored, when another command made the file

    @property
    def commands(self) -> str:
        """The commands that reproduce the stored settings (selection, then tuning)."""
        return " && ".join(c for c in (self.command, self.tune_command) if c)
    overrides: dict = field(default_factory=dict)  # a non-learned member's tuned settings (dotted config keys)


def single_member(name: str, run: Path, **fields) -> EnsembleSpec:
    """A one-member ensemble of a finished CV run, post-processed as the run's own config says."""
    post = _post_of(Path(run), _run_config(Path(run)))
    return EnsembleSpec(name=name, members=[MemberRef(str(run), 1.0)], post=post, **fields)


def ensemble_path(name: str, runs: Path) -> Path:
    """runs/ensembles/NAME.yaml (a NAME that would leave that folder is a user error)."""
    return Workspace(runs).ensembles / f"{check_name(name, '--name', 'ensemble name')}.yaml"


def is_ensemble(name: str, runs: Path) -> bool:
    """Whether `name` is an ensemble file's path or the name of a stored ensemble (a run folder or experiment is not)."""
    try:
        return name.endswith(".yaml") and Path(name).is_file() or ensemble_path(name, runs).is_file()
    except UserError:  # not a valid ensemble name: a path of another kind
        return False


def check_selected_on(spec: EnsembleSpec, data: Dataset, where) -> None:
    """An ensemble is applied only to data with the labels it was selected and tuned on (a user error otherwise)."""
    if spec.data.get("y_train") and spec.data["y_train"] != data.fingerprint()["y_train"]:
        raise UserError(where, f"ensemble '{spec.name}' was selected on other data ({spec.data.get('root')}), not on {data.root}")


def load_ensemble(name: str, runs: Path) -> EnsembleSpec:
    """Load an ensemble file by name (or path)."""
    path = Path(name) if name.endswith(".yaml") else ensemble_path(name, runs)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Workspace(runs).ensembles.glob("*.yaml"))) or "none"
        raise UserError(path, f"ensemble not found (known: {known}; make one with `comp ensemble`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(path, "invalid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(path, "empty, or not a mapping: not an ensemble file (make one with `comp ensemble` or `comp tune`)")
    spec = from_dict(EnsembleSpec, raw, str(path))
    if not spec.members:
        raise UserError(path, "names no member run ('members' is empty): not an ensemble to use")
    return spec


def save_ensemble(spec: EnsembleSpec, runs: Path) -> Path:
    """Write the ensemble file atomically."""
    path = ensemble_path(spec.name, runs)
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    return path


def merger_path(name: str, runs: Path) -> Path:
    """Where an ensemble's test-set merge model lives."""
    return Workspace(runs).ensembles / f"{name}.merge.txt"


def build_ensemble(
    name: str,
    runs_in: Sequence[Path],
    data: Dataset,
    runs: Path,
    max_steps: int = 8,
    images: int = 0,
    workers: int = 0,
    command: str = "",
    force: bool = False,
) -> tuple[EnsembleSpec, bool]:
    """Greedy selection over candidate runs; the ensemble file is written unless a better one is stored."""
    if not runs_in:
        raise UserError(runs, f"no finished CV run with cached maps on data '{data.name}': run `comp cv` on a learned experiment first")
    oof = OOF.load(runs_in, data)
    singles = []
    for m in oof.members:
        s = oof.scores([1.0 if x is m else 0.0 for x in oof.members], m.post, workers=workers)
        singles.append(float(s.mean()))
        print(f"{m.label}: OOF ARI {s.mean():.4f} (own post-processing)", flush=True)
    post = oof.members[int(np.argmax(singles))].post
    idx = oof.subset(images)
    counts, path = greedy_select(oof, post, max_steps, idx, workers)
    chosen = [j for j, c in enumerate(counts) if c]
    final = oof.scores(counts, post, workers=workers)
    # Honest: each fold's images scored with the selection made on the other folds' images.
    nested = nested_scores(oof.folds, idx, lambda inner: greedy_select(oof, post, max_steps, inner, workers, verbose=False)[0],
                           lambda counts_k, held: oof.scores(counts_k, post, idx=held, workers=workers))  # fmt: skip
    print(f"selection: in-sample OOF ARI {final.mean():.4f}, nested {nested.mean():.4f}", flush=True)
    spec = EnsembleSpec(
        name=name,
        members=[MemberRef(str(oof.members[j].run), round(counts[j] / sum(counts), 6)) for j in chosen],
        post=post,
        oof_ari=float(final.mean()),
        oof_std=float(final.std()),
        oof_ari_no_merge=float(final.mean()),
        nested_ari=float(nested.mean()),
        data=data.fingerprint(),
        history=[{"candidate": m.label, "oof_ari": round(s, 6)} for m, s in zip(oof.members, singles)] + path,
        command=command,
    )
    old = ensemble_path(name, runs)
    if old.is_file() and not force:
        stored = load_ensemble(name, runs)
        if stored.nested_ari is not None and stored.nested_ari > spec.nested_ari:
            print(f"kept {old}: its nested OOF ARI {stored.nested_ari:.4f} beats {spec.nested_ari:.4f} (use --force to replace)")
            return stored, False
    save_ensemble(spec, runs)
    return spec, True
