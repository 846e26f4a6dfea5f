"""The benchmark command runs (quick mode) and its correctness checks hold; speed is reported, not asserted."""

from __future__ import annotations

import json
from pathlib import Path

from comp.bench import run_bench


def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = run_bench(quick=True, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["metric"]["max_abs_diff"] < 1e-9
    assert res["csv"]["read_identical"] and res["csv"]["write_identical"] and res["csv"]["write_bytes_identical"]
    for key in ("official_watershed_ms", "smooth_watershed_ms", "maps_to_instances_ms"):
        assert res["postprocess"][key] > 0
