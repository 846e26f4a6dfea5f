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


def test_gpu_bench_dry_run_covers_every_gpu_config_and_a_missing_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    from comp.bench import gpu_configs
    from tests.conftest import run_cli

    out = tmp_path / "bench_gpu.json"
    r = run_cli("bench", "--gpu", "--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["dry_run"] and set(res["configs"]) == set(gpu_configs()) and {"unet_mnv3", "unet_resnet34"} <= set(res["configs"])
    for c in res["configs"].values():
        assert c["train_images_per_s"] > 0 and c["infer_tta_images_per_s"] > 0 and c["make_cv_hours_400"] > 0
    if not torch.cuda.is_available():  # the CI machine: the real benchmark refuses with one line
        r = run_cli("bench", "--gpu", "--out", str(tmp_path / "x.json"))
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "x.json").exists()


def test_cv_projection_counts_training_validation_and_predictions() -> None:
    from comp.bench import projected_cv_hours
    from comp.config import load_experiment

    exp = load_experiment("unet_mnv3")  # 5 folds, 80 epochs, 32 validation images every 2 epochs, TTA
    fit = 400 * 4 / 5 - 32
    want = 5 * (fit * 80 / 100 + 32 * 40 / 200 + (80 + 500) / 50) / 3600
    assert abs(projected_cv_hours(exp, 100.0, 200.0, 50.0) - want) < 1e-9
