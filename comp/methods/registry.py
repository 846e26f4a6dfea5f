"""Method registry: every method (baseline or learned) plugs into CV and submit by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from comp.core.errors import UserError
from comp.methods.base import Method


# Modules whose import registers methods; loaded lazily so `comp score` never imports torch.
_PROVIDERS = ("comp.methods.baselines", "comp.methods.hybrid", "comp.methods.unet")


@dataclass
class MethodSpec:
    """A registered method: its name, parameter dataclass and constructor."""

    name: str
    params: type
    build: Callable[[object], Method]
    # `comp tune` of a method that caches no maps: params field -> (low, high, log), searched with the
    # contrast window; `fixed` are the params that make fit() a no-op while a trial is scored.
    space: dict[str, tuple[float, float, bool]] = field(default_factory=dict)
    fixed: dict[str, object] = field(default_factory=dict)
    pseudo: bool = False  # fit() trains on FoldData.pseudo as well (the experiment's `pseudo:` section may be set)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, params: type, space: dict | None = None, fixed: dict | None = None,
                    pseudo: bool = False) -> Callable:  # fmt: skip
    """Class decorator: register a method under `name`, configured by the dataclass `params`."""

    def deco(cls: Callable[[object], Method]) -> Callable[[object], Method]:
        METHODS[name] = MethodSpec(name, params, cls, dict(space or {}), dict(fixed or {}), pseudo)
        return cls

    return deco


def get_method(name: str, where: str | Path = "config") -> MethodSpec:
    """Look a method up by name, with a clear error listing the known ones."""
    for mod in _PROVIDERS:
        importlib.import_module(mod)
    if name not in METHODS:
        raise UserError(where, f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]
