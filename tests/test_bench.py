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
    assert res["inference"]["unet_cpu"]["ms_per_slice"] > 0 and res["inference"]["unet_cpu"]["resolution"] == 256
    assert res["tuning"]["trials"] == 3 and res["tuning"]["trials_per_minute"] > 0
    sm = res["submit_memory"]
    assert sm["test_slices"] == 8 and sm["members"] == 3 and sm["peak_pss_mb"] > 50  # the whole process tree was seen
