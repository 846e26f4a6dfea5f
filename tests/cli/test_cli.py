"""The command line as installed: `make venv` puts a `comp` command beside `python -m comp`."""

from __future__ import annotations

import os
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


def test_quiet_and_verbose_set_what_the_stages_say(capsys, monkeypatch) -> None:
    """-q / -v are taken before or after the command; -q keeps results and warnings, -qq warnings, -v adds details."""
    from comp.cli import parser
    from comp.core.log import LOG, progress, result, set_verbosity

    p = parser()
    assert p.parse_args(["-q", "leaderboard"]).quiet == 1 and p.parse_args(["leaderboard", "-qq"]).quiet == 2
    assert p.parse_args(["-q", "leaderboard", "-q"]).quiet == 1  # the command's count, not a sum
    assert p.parse_args(["cv", "smooth_watershed", "-v"]).verbose == 1 and not hasattr(p.parse_args(["leaderboard"]), "quiet")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def said(quiet: int, verbose: int) -> tuple[str, str]:
        set_verbosity(quiet, verbose)
        LOG.debug("detail")
        LOG.info("progress")
        result("table")
        LOG.warning("careful")
        out = capsys.readouterr()
        return out.out, out.err

    try:
        shown, hidden = progress(range(2)), progress(range(2), hide=True)
        assert not shown.disable and hidden.disable
        shown.close(), capsys.readouterr()
        assert said(0, 0) == ("progress\ntable\n", "careful\n")
        assert said(0, 1) == ("detail\nprogress\ntable\n", "careful\n")
        assert said(1, 0) == ("table\n", "careful\n")
        assert os.environ.get("TQDM_DISABLE") == "1", "-q hides the progress bars too"
        set_verbosity(1, 0)
        assert progress(range(2)).disable, "even a bar whose caller decides when it shows"
        assert said(2, 0) == ("", "careful\n")
    finally:
        set_verbosity(0, 0)
