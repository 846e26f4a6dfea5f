"""Process-parallel maps: results in order, and a worker that dies fails the call instead of hanging it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT


def test_results_come_back_in_order() -> None:
    from comp.core.parallel import pmap

    assert pmap(lambda i, k: i * k, list(range(20)), 3, workers=2) == [3 * i for i in range(20)]


def test_a_worker_that_dies_fails_the_call_instead_of_hanging() -> None:
    """A crash in native code (a NaN once made skimage abort with `malloc(): invalid next size`) kills the worker:
    the command must end with one clear error, not wait for ever (multiprocessing.Pool waited)."""
    code = textwrap.dedent("""
        import os
        from comp.core.parallel import pmap
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


def test_the_cpu_share_follows_affinity_quota_and_the_runs_gpu_processes(monkeypatch, tmp_path) -> None:
    """16 cores allowed, a 6-CPU container quota, two GPU processes: 3 each; loaders keep one for the training loop."""
    from comp.core import parallel
    from comp.core.errors import UserError
    from comp.nets.train import loader_workers

    read_quota = parallel.cgroup_cpus
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(parallel, "cgroup_cpus", lambda: None)
    monkeypatch.setenv(parallel.GPU_PROCS_ENV, "2")
    assert parallel.cpu_share() == 8 and loader_workers(8) == 7 and loader_workers(2) == 2
    monkeypatch.setattr(parallel, "cgroup_cpus", lambda: 6)
    assert parallel.cpu_share() == 3 and loader_workers(8) == 2 and parallel.n_workers(0) == 3 and parallel.n_workers(5) == 5
    monkeypatch.setenv(parallel.GPU_PROCS_ENV, "0")
    with pytest.raises(UserError, match="COMP_GPU_PROCS"):
        parallel.cpu_share()
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")
    assert read_quota(str(quota)) == 3
    quota.write_text("max 100000\n")
    assert read_quota(str(quota)) is None and read_quota(str(tmp_path / "none")) is None
