"""Experiment configs: one YAML per experiment, parsed into typed dataclasses, looked up by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comp.core.errors import UserError
from comp.core.fields import bounded, check_fields, identity
from comp.data.contrast import ContrastParams
from comp.methods.registry import METHODS, get_method

EXPERIMENTS = Path("experiments")
PRETRAIN_EXPERIMENTS = EXPERIMENTS / "pretrain"  # the self-supervised pretraining configs (their own kind)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: str, where: str | Path, what: str = "name") -> str:
    """A name that becomes a folder or file under runs/: letters, digits, '_', '.', '-' only, never '.' or '..'."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(where, f"{what} '{name}' may only use letters, digits, '_', '.' and '-' (it names a folder under runs/)")
    return name


@dataclass
class CVConfig:
    """How the annotated images are split into folds."""

    folds: int = bounded(5, lo=2)
    seed: int = bounded(0, lo=0)
    groups: str = "auto"  # auto (groups.csv if the data has one, else scans inferred from the images) | file | inferred | none (random folds)
    extra: list[str] = field(default_factory=list)  # data folders whose annotated slices join every training part, never scored
    fit_seed: int = bounded(0, lo=0)  # moves every fold's fitting seed (initialisation, sampling, mergers), not the folds

    def fold_seed(self, fold: int) -> int:
        """The seed fold `fold` is fitted with: re-running with another `fit_seed` measures the fit's own noise."""
        return self.full_fit_seed() + fold

    def full_fit_seed(self) -> int:
        """The seed a fit on every annotated slice (submit, transfer) uses: `fit_seed` moves it as it moves the folds'."""
        return self.seed + 1000 * self.fit_seed

    def violations(self) -> dict[str, str]:
        """The choices no range states."""
        return {} if self.groups in GROUPS else {"groups": f"must be one of {', '.join(GROUPS)}, got {self.groups!r}"}


GROUPS = ("auto", "file", "inferred", "none")


@dataclass
class PseudoParams:
    """The `pseudo:` section of an experiment: which run teaches and which of its labels are kept."""

    teacher: str = ""  # experiment (name or path) whose CV run labels the unlabelled slices; "" = no pseudo-labels
    teacher_set: list[str] = field(default_factory=list)  # --set overrides of the teacher (e.g. the same budget)
    images: int = bounded(200, lo=0)  # keep the this many most confident unlabelled slices (0 = every one)
    min_confidence: float = bounded(0.0, lo=0, hi=1)  # and only those at least this confident (0..1)
    chunk: int = bounded(32, lo=1)  # unlabelled slices predicted at a time (bounds memory)

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def tag(self, n_train: int) -> str:
        """Names a cache of selected labels: the selection settings and the training set's size."""
        key = {"images": self.images, "min_confidence": self.min_confidence, "n_train": n_train}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class Experiment:
    """A resolved experiment: a method name, its typed parameters and the CV settings."""

    name: str
    method: str
    params: Any
    cv: CVConfig = field(default_factory=CVConfig)
    contrast: ContrastParams = field(default_factory=ContrastParams)
    pseudo: PseudoParams = field(default_factory=PseudoParams)
    description: str = ""
    path: str = ""

    def to_dict(self) -> dict:
        """Plain-data form of the resolved config, as stored with a run."""
        d = {
            "name": self.name,
            "method": self.method,
            "description": self.description,
            "params": dataclasses.asdict(self.params),
            "cv": {k: v for k, v in dataclasses.asdict(self.cv).items() if k not in ("extra", "fit_seed") or v},  # unset: digests as before
            "contrast": dataclasses.asdict(self.contrast),
        }
        if self.pseudo.enabled:  # only then: configs without pseudo-labels keep their digests (and finished runs)
            d["pseudo"] = dataclasses.asdict(self.pseudo)
        return d

    def digest(self) -> str:
        """Short hash of the resolved config (the file path and description left out)."""
        d = self.to_dict()
        d.pop("description")
        d["params"] = identity(self.params)  # execution-only settings (checkpoint cadence) change how, not what
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Convert a YAML value to the annotated field type, or raise a UserError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(where, f"'{key}' must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(where, f"'{key}' must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not float(value).is_integer()):
            raise UserError(where, f"'{key}' must be {'an integer' if tp is int else 'a number'}, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan and .inf: never a meaningful setting (a NaN depth crashed workers)
            raise UserError(where, f"'{key}' must be a finite number, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(where, f"'{key}' must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the list of known ones."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(where, f"'{prefix or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(where, f"unknown key '{dotted}' (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], where, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return check_fields(cls(**kwargs), where, prefix)  # declared ranges (comp.core.fields), before any work


def experiment_path(name_or_path: str, folder: Path = EXPERIMENTS) -> Path:
    """Resolve 'NAME' or a path to an existing YAML file (experiments/ holds segmentation experiments,
    experiments/pretrain/ the pretraining ones)."""
    p = Path(name_or_path)
    for cand in (p, folder / f"{name_or_path}.yaml", folder / name_or_path):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in folder.glob("*.yaml"))) or "none"
    raise UserError(p, f"experiment not found (known in {folder}/: {known})")


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """Apply 'dotted.key=value' overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError("--set", f"expected KEY=VALUE, got '{item}'")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(where, f"cannot set '{key}': '{part}' is not a mapping")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def extra_override(dirs: list[str]) -> list[str]:
    """The `--set` override that gives an experiment these extra training data folders (none: no override)."""
    return [f"cv.extra={json.dumps(list(dirs))}"] if dirs else []


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> Experiment:
    """Load and validate an experiment YAML by name or path, with optional --set overrides."""
    path = experiment_path(name_or_path)
    return experiment_from_dict(raw_config(path), path, overrides)


def raw_config(path: Path, folder: Path = EXPERIMENTS, seen: tuple[Path, ...] = ()) -> dict:
    """An experiment file's mapping; with `base: NAME`, that experiment's mapping with this file's keys laid over it
    (nested mappings merged key by key): a variant is the delta of its base. Its name is its own, never the base's."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(path, f"invalid YAML{at}") from None
    if not isinstance(raw, dict):
        raise UserError(path, "top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = experiment_path(str(base), folder)
    if parent.resolve() in seen or parent.resolve() == path.resolve():
        raise UserError(path, f"'base: {base}' leads back to itself")
    under = raw_config(parent, folder, (*seen, path.resolve()))
    under.pop("name", None)
    under.pop("description", None)
    return _laid_over(under, raw)


def _laid_over(under: dict, over: dict) -> dict:
    """`over`'s keys over `under`'s, nested mappings merged key by key."""
    out = dict(under)
    for k, v in over.items():
        out[k] = _laid_over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def experiment_from_dict(raw: dict, path: Path, overrides: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Experiment:
    """Validate a raw experiment mapping (a YAML file, or a run's config.yaml with `ignore`d extra keys)."""

    raw = apply_overrides({k: v for k, v in raw.items() if k not in ignore}, overrides or [], str(path))
    allowed = {"name", "method", "description", "params", "cv", "contrast", "pseudo"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(path, f"unknown key '{unknown[0]}' (known: {', '.join(sorted(allowed))})")
    if "method" not in raw:
        raise UserError(path, "missing key 'method'")
    spec = get_method(str(raw["method"]), path)
    pseudo = from_dict(PseudoParams, raw.get("pseudo"), str(path), "pseudo")
    if pseudo.enabled and not (pseudo.teacher.endswith(".yaml") and Path(pseudo.teacher).is_file()):
        check_name(pseudo.teacher, path, "pseudo.teacher")  # an experiment name, or the path of an existing YAML
    if pseudo.enabled and not spec.pseudo:
        raise UserError(path, f"'pseudo.teacher' is set but method '{spec.name}' does not train on pseudo-labels "
                        f"(those that do: {', '.join(sorted(n for n, m in METHODS.items() if m.pseudo))})")  # fmt: skip
    return Experiment(
        name=check_name(str(raw.get("name", path.stem)), path),
        method=spec.name,
        params=from_dict(spec.params, raw.get("params"), str(path), "params"),
        cv=from_dict(CVConfig, raw.get("cv"), str(path), "cv"),
        contrast=from_dict(ContrastParams, raw.get("contrast"), str(path), "contrast"),
        pseudo=pseudo,
        description=str(raw.get("description", "")),
        path=str(path),
    )
