"""The command line as installed: `make venv` puts a `comp` command beside `python -m comp`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_comp_command_is_installed_and_is_the_same_cli() -> None:
    comp = Path(sys.executable).with_name("comp")
    assert comp.is_file(), f"{comp} missing: `make venv` installs the package (pip install -e .)"
    r = subprocess.run([str(comp), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "cv" in r.stdout and "submit" in r.stdout
    bad = subprocess.run([str(comp), "score", "no.csv", "no.csv"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
