"""Process-parallel maps: results in order, and a worker that dies fails the call instead of hanging it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_results_come_back_in_order() -> None:
    from comp.parallel import pmap

    assert pmap(lambda i, k: i * k, list(range(20)), 3, workers=2) == [3 * i for i in range(20)]


def test_a_worker_that_dies_fails_the_call_instead_of_hanging() -> None:
    """A crash in native code (a NaN once made skimage abort with `malloc(): invalid next size`) kills the worker:
    the command must end with one clear error, not wait for ever (multiprocessing.Pool waited)."""
    code = textwrap.dedent("""
        import os
        from comp.parallel import pmap
        from comp.cli import main
        import comp.cli

        def crash(i):
            if i == 5:
                os.abort()
            return i

        def cmd(a):
            pmap(crash, list(range(12)), workers=2)
            return 0

        comp.cli.cmd_leaderboard = cmd  # a command whose map crashes: the error goes through main() as a user's would
        raise SystemExit(main(["leaderboard"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "a worker process of crash died" in r.stderr and "Traceback" not in r.stderr
