"""Declared ranges of numeric config fields: written beside each field, checked in one place (`check_fields`).

    epochs: int = bounded(40, lo=1)
    fit_h: list[float] = bounded(factory=lambda: [0.005], lo=0, lo_open=True, min_len=1)

`comp.pipeline.config.from_dict` checks every dataclass it builds (experiment YAMLs, `--set` overrides, suites,
ensemble files), and the CLI builds its own dataclasses (the importer's settings) through it too, so a
value out of range is one line naming its key and the range, exit code 2, before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from comp.core.errors import UserError

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers (None: unbounded on that side) and, for lists, their allowed lengths."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    min_len: int = 0
    max_len: int | None = None

    def admits(self, v: float) -> bool:
        """Whether one number lies in the interval."""
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def describe(self) -> str:
        """'at least 1', 'in 0..1', 'above 0', ..."""
        lo = None if self.lo is None else f"{'above' if self.lo_open else 'at least'} {self.lo:g}"
        hi = None if self.hi is None else f"{'below' if self.hi_open else 'at most'} {self.hi:g}"
        if lo and hi and not (self.lo_open or self.hi_open):
            return f"in {self.lo:g}..{self.hi:g}"
        return " and ".join(x for x in (lo, hi) if x) or "any number"


def bounded(default: Any = _NO_DEFAULT, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, min_len: int = 0, max_len: int | None = None, factory: Callable | None = None,
            execution: bool = False, added: bool = False) -> Any:  # fmt: skip
    """A dataclass field whose numbers (a list's items too) must lie in [lo, hi] (open ends if asked).

    `execution`: the field says how a run is carried out, not what it computes (checkpoint cadence): it is left out of
    the run's identity (`identity`), so changing it neither starts a new run nor refuses a resume. `added`: as the
    function `added`, a field added after runs were made (left out of their identity while at its default)."""
    meta = {"range": Range(lo, hi, lo_open, hi_open, min_len, max_len), "execution": execution, "added": added}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def setting(default: Any) -> Any:
    """A non-numeric execution-only field (see `bounded`'s `execution`): how a run is carried out, not its identity."""
    return dataclasses.field(default=default, metadata={"execution": True})


def added(default: Any) -> Any:
    """A non-numeric field added after runs were made: left out of a run's identity while at its default, so the
    runs made before it existed (which had that behaviour) are still found and resumed."""
    return dataclasses.field(default=default, metadata={"added": True})


def _left_out(f: dataclasses.Field, value: Any) -> bool:
    """Whether a field's value is outside a run's identity: execution-only, or added later and at its default."""
    return bool(f.metadata.get("execution")) or bool(f.metadata.get("added") and value == f.default)


def identity(obj: Any) -> Any:
    """`dataclasses.asdict` of a config without its execution-only fields, nor `added` ones at their default (at any
    depth): what identifies a run."""
    if not dataclasses.is_dataclass(obj):
        return obj
    return {f.name: identity(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not _left_out(f, getattr(obj, f.name))}


def identity_of(cls: type, stored: dict) -> dict:
    """`identity` of a config stored as plain data (`asdict` of a `cls`, e.g. in a checkpoint); keys `cls` does not
    declare are kept, so a stored config from other code never passes for this one."""
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in stored.items():
        f = declared.get(k)
        if f is not None and _left_out(f, v):
            continue
        nested = f is not None and dataclasses.is_dataclass(hints[k]) and isinstance(v, dict)
        out[k] = identity_of(hints[k], v) if nested else v
    return out


def _numbers(value: Any) -> list[float]:
    """The numbers in a value (itself, or the items of nested lists); bools are not numbers here."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def check_fields(obj: Any, where: str, prefix: str = "") -> Any:
    """Every declared range of a dataclass instance (not recursing: nested ones are checked when built), and its
    `violations()` (relations between fields) if it has any; the first problem is a UserError naming the key.
    NaN and infinities never get here: `config.from_dict`, the only caller, refuses them while coercing."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        rng: Range | None = f.metadata.get("range")
        if rng is None:
            continue
        if isinstance(value, (list, tuple)):
            n = len(value)
            if n < rng.min_len or (rng.max_len is not None and n > rng.max_len):
                want = f"exactly {rng.min_len}" if rng.max_len == rng.min_len else f"at least {rng.min_len}"
                raise UserError(where, f"'{key}' needs {want} value{'s' if rng.min_len != 1 else ''}, got {list(value)!r}")
        bad = [v for v in _numbers(value) if not rng.admits(v)]
        if bad:
            raise UserError(where, f"'{key}' must be {rng.describe()}, got {bad[0]!r}")
    problems = obj.violations() if hasattr(obj, "violations") else {}
    if problems:
        rel_key, problem = next(iter(problems.items()))
        raise UserError(where, f"'{f'{prefix}.{rel_key}' if prefix else rel_key}' {problem}")
    return obj
