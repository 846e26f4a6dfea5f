"""The benchmark command runs (quick mode) and its correctness checks hold; speed is reported, not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comp.bench.timings import run_bench


@pytest.mark.slow
def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = run_bench(quick=True, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["metric"]["max_abs_diff"] < 1e-9
    assert res["csv"]["read_identical"] and res["csv"]["write_identical"] and res["csv"]["write_bytes_identical"]
    for key in ("official_watershed_ms", "smooth_watershed_ms", "maps_to_instances_ms"):
        assert res["postprocess"][key] > 0
    mg = res["merging"]  # the region graph's rows are the ones a pass over the merged map gives, every round
    assert mg["identical"] and mg["rounds"] == 4 and mg["graph_ms"] > 0 and mg["reread_ms"] > 0 and mg["superpixels"] > 50
    assert res["inference"]["unet_cpu"]["ms_per_slice"] > 0 and res["inference"]["unet_cpu"]["resolution"] == 256
    assert res["tuning"]["trials"] == 3 and res["tuning"]["trials_per_minute"] > 0
    g = res["gpu_run_cpu_side"]
    assert g["config"] == "unet_resnet34" and g["pipeline"]["host_ms"] > 0 and g["pipeline"]["device_ms"] > 0
    assert g["targets"]["size"] == 384 and g["targets"]["edt_ms"] > 0 and g["targets"]["scipy_edt_ms"] > 0
    assert g["quantise"]["channels"] == 19 and g["quantise"]["ours_ms"] > 0 and g["post_ms"] > 0
    sm = res["submit_memory"]
    assert sm["test_slices"] == 8 and sm["members"] == 3 and sm["peak_pss_mb"] > 50  # the whole process tree was seen


@pytest.mark.slow
def test_gpu_bench_dry_run_covers_every_gpu_config_and_a_missing_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    from comp.bench.timings import gpu_configs
    from tests.conftest import run_cli

    out = tmp_path / "bench_gpu.json"
    r = run_cli("bench", "--gpu", "--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["dry_run"] and set(res["configs"]) == set(gpu_configs()) and {"unet_mnv3", "unet_resnet34"} <= set(res["configs"])
    for c in res["configs"].values():
        assert c["train_images_per_s"] > 0 and c["infer_tta_images_per_s"] > 0 and c["projection"]["estimate"]
        assert c["cpu"]["sample_ms"] > 0 and c["cpu"]["quantise"]["channels"] == 19 and c["cpu"]["post_ms"] > 0
    assert "ESTIMATE" in r.stdout and "training bound by the" in r.stdout and "quantise" in r.stdout
    if not torch.cuda.is_available():  # the CI machine: the real benchmark refuses with one line
        r = run_cli("bench", "--gpu", "--out", str(tmp_path / "x.json"))
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "x.json").exists()


def test_cv_projection_counts_every_term_and_overlaps_the_loader_with_the_gpu() -> None:
    """unet_mnv3 (5 folds, 80 epochs, 32 validation images every 2 epochs, TTA, 8 loader workers) on a 16-core box."""
    from comp.pipeline.config import load_experiment
    from comp.bench.speed import project

    exp = load_experiment("unet_mnv3")
    fit = 400 * 4 / 5 - 32
    p = project(exp, 100.0, 200.0, 50.0, sample_ms=20.0, quant_ms=10.0, post_ms_=32.0, cpus=16)
    assert p.train_gpu_s == pytest.approx(5 * fit * 80 / 100) and p.train_cpu_s == pytest.approx(5 * fit * 80 * 0.020 / 8)
    assert p.val_gpu_s == pytest.approx(5 * 40 * 32 / 200) and p.val_post_s == pytest.approx(5 * 40 * 32 * 0.032 / 16)
    assert p.predict_gpu_s == pytest.approx(5 * (80 + 500) / 50) and p.quantise_s == pytest.approx(5 * 580 * 0.010)
    rest = p.val_gpu_s + p.val_post_s + p.predict_gpu_s + p.quantise_s + p.post_s
    assert p.total_s == pytest.approx(p.train_gpu_s + rest)  # the GPU is slower than 8 workers: they keep up
    slow = project(exp, 100.0, 200.0, 50.0, sample_ms=200.0, quant_ms=10.0, post_ms_=32.0, cpus=16)
    assert slow.total_s == pytest.approx(slow.train_cpu_s + rest) and "CPU (loader workers)" in slow.describe()
