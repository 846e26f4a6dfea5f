"""Ensembles: the ensemble file and its selection (greedy over finished runs' OOF maps, checked nested).

An ensemble file (runs/ensembles/NAME.yaml) names its member CV runs with weights, the post-processing
parameters and the region-merging setting; `comp tune` improves it, `comp submit --ensemble` uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.fields import bounded
from comp.core.log import LOG
from comp.data.dataset import Dataset
from comp.methods.merge import MergeKind
from comp.nets.targets import PostParams
from comp.pipeline.config import check_name, from_dict
from comp.pipeline.oof import OOF, finished_runs, latest_per_config, post_of, resolve_run, run_config
from comp.pipeline.select import greedy_select, nested_scores
from comp.pipeline.workspace import Workspace
from comp.regions.superpixels import Regions


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
    linkage: str = "classifier"  # how `tune` fitted the merger (comp.methods.merge.MergeKind; its file says the same)
    relative: bool = False
    calibrate: bool = False  # the merger file holds the map (comp.methods.merge.Calibration)
    drop: list[str] = field(default_factory=list)  # features the merger is blind to (its file says the same)

    def kind(self, linkage: str | None = None, relative: bool | None = None, calibrate: bool | None = None,
             drop: list[str] | None = None) -> MergeKind:  # fmt: skip
        """The merger's kind as stored, with what is given (not None) in its place."""
        return MergeKind(linkage or self.linkage, self.relative if relative is None else relative,
                         self.calibrate if calibrate is None else calibrate, tuple(self.drop if drop is None else drop))  # fmt: skip


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
    post = post_of(Path(run), run_config(Path(run)))
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
        LOG.info(f"{m.label}: OOF ARI {s.mean():.4f} (own post-processing)")
    post = oof.members[int(np.argmax(singles))].post
    idx = oof.subset(images)
    counts, path = greedy_select(oof, post, max_steps, idx, workers)
    chosen = [j for j, c in enumerate(counts) if c]
    final = oof.scores(counts, post, workers=workers)
    # Honest: each fold's images scored with the selection made on the other folds' images.
    nested = nested_scores(oof.folds, idx, lambda inner: greedy_select(oof, post, max_steps, inner, workers, verbose=False)[0],
                           lambda counts_k, held: oof.scores(counts_k, post, idx=held, workers=workers))  # fmt: skip
    LOG.info(f"selection: in-sample OOF ARI {final.mean():.4f}, nested {nested.mean():.4f}")
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
            LOG.info(f"kept {old}: its nested OOF ARI {stored.nested_ari:.4f} beats {spec.nested_ari:.4f} (use --force to replace)")
            return stored, False
    save_ensemble(spec, runs)
    return spec, True


def tune_target(name: str, exp: str | None, runs: Path, data: Dataset, workers: int, command: str) -> tuple[EnsembleSpec, bool]:
    """What `comp tune NAME` tunes, and whether it is a new one-member ensemble (saved once its maps load): the stored
    ensemble NAME; for `default` with finished map runs, a greedy selection over the newest run of each config; else a
    one-member ensemble of the experiment's newest run (for `default`: --exp, the Makefile's EXP)."""
    if is_ensemble(name, runs) or name.endswith(".yaml"):
        return load_ensemble(name, runs), False
    done = finished_runs(runs, data) if name == "default" else []
    if done:  # nothing selected yet: select over every finished map run first
        return build_ensemble(name, latest_per_config(done), data, runs, workers=workers, command=command)[0], False
    exp = exp if name == "default" else name
    if not exp:
        raise UserError(runs, f"no finished CV run with cached maps on data '{data.name}': run `comp cv` first, or name an experiment")
    return single_member(Path(name).name, resolve_run(exp, runs, data, maps=False), data=data.fingerprint(), command=command), True
