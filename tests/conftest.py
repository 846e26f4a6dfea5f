"""Shared fixtures: a tiny phantom data set in the exact challenge layout, made once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep .npy caches out of the data folders the tests make."""
    os.environ["COMP_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training slices (8 annotated) and 4 test slices."""
    from comp.data.phantom import generate

    return generate(tmp_path_factory.mktemp("phantom"), n_train=12, n_labelled=8, n_test=4, seed=3, workers=2)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python -m comp ARGS` and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "comp", *args], cwd=cwd, env=env, capture_output=True, text=True)
