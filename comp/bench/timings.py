"""Benchmarks, each measured against its reference in the same run: `python -m comp bench`."""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from comp.bench.speed import GPU_ESTIMATE, best_of, cpu_terms, project, sample_slices, synthetic_maps
from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.log import result
from comp.core.metric import image_score
from comp.core.parallel import pmap
from comp.core.runtime import Amp, describe, device
from comp.core.store import MapArray, quantise, save_maps, write_maps
from comp.data.contrast import ContrastParams, resolve
from comp.data.dataset import Dataset
from comp.data.images import default_row_labels, image_names, write_images
from comp.data.labels import read_label_csv, write_label_csv
from comp.methods.baselines import OfficialWatershedParams, SmoothWatershedParams, official_watershed, smooth_watershed
from comp.methods.compose import segment
from comp.methods.merge import FEATURES, GRAD_SIGMA, FeatureGraph, matching, pair_features
from comp.nets.infer import predict_maps
from comp.nets.models import build_model
from comp.nets.targets import PostParams, instances_from_maps, upsample_maps
from comp.nets.train import SliceSet, make_loader, make_optimizer, step_loss
from comp.pipeline.config import EXPERIMENTS, load_experiment
from comp.pipeline.ensemble import EnsembleSpec, MemberRef, save_ensemble
from comp.pipeline.oof import OOF, RunMaps
from comp.pipeline.tune import tune
from comp.pipeline.workspace import RunDir
from comp.regions.ops import merge_pairs
from comp.regions.superpixels import SuperpixelParams, gradient, superpixels


def bench_metric(ys: np.ndarray) -> dict:
    """Per-image metric time: ours vs sklearn's adjusted_rand_score, and their largest difference."""
    from sklearn.metrics import adjusted_rand_score


    rng = np.random.default_rng(0)
    preds = [np.where(rng.random(y.shape) < 0.1, rng.integers(0, 40, y.shape), y).astype(np.uint8) for y in ys]
    ours = best_of(lambda: [image_score(y, p) for y, p in zip(ys, preds)], 5) / len(ys)
    ref = best_of(lambda: [adjusted_rand_score(y[y > 0], p[y > 0]) for y, p in zip(ys, preds)], 3) / len(ys)
    diff = max(abs(image_score(y, p) - adjusted_rand_score(y[y > 0], p[y > 0])) for y, p in zip(ys, preds))
    return {"ours_ms": ours * 1e3, "sklearn_ms": ref * 1e3, "speedup": ref / ours, "max_abs_diff": diff}


def bench_csv(ys: np.ndarray, n_read: int, n_write: int, tmp: Path) -> dict:
    """Y_train read vs pandas.read_csv defaults, submission write vs DataFrame.to_csv (same content)."""
    import pandas as pd


    reps = int(np.ceil(max(n_read, n_write) / len(ys)))
    big = np.concatenate([ys] * reps)
    y_path = tmp / "Y_train.csv"
    write_label_csv(y_path, big[:n_read])
    t_ours = best_of(lambda: read_label_csv(y_path), 1)
    t_pd = best_of(lambda: pd.read_csv(y_path), 1)
    same_read = np.array_equal(read_label_csv(y_path).maps, pd.read_csv(y_path, index_col=0).to_numpy().T.reshape(-1, 512, 512))

    sub = big[:n_write]
    ours_path, pd_path = tmp / "ours.csv", tmp / "pandas.csv"
    df = pd.DataFrame(sub.reshape(n_write, -1).T, index=default_row_labels(), columns=image_names(n_write))
    w_ours = best_of(lambda: write_label_csv(ours_path, sub), 1)
    w_pd = best_of(lambda: df.to_csv(pd_path), 1)
    same_write = np.array_equal(
        pd.read_csv(ours_path, index_col=0).to_numpy(), pd.read_csv(pd_path, index_col=0).to_numpy()
    )
    return {
        "read_columns": n_read,
        "read_ours_s": t_ours,
        "read_pandas_s": t_pd,
        "read_speedup": t_pd / t_ours,
        "read_identical": bool(same_read),
        "write_columns": n_write,
        "write_ours_s": w_ours,
        "write_pandas_s": w_pd,
        "write_speedup": w_pd / w_ours,
        "write_identical": bool(same_write),
        "write_bytes_identical": ours_path.read_bytes() == pd_path.read_bytes(),
    }


def bench_postprocess(xs: np.ndarray, ys: np.ndarray) -> dict:
    """Milliseconds per 512x512 slice on one core: the non-learned pipelines and the map post-processor."""

    n = len(xs)
    maps = synthetic_maps(ys)
    return {
        "official_watershed_ms": best_of(lambda: [official_watershed(x, OfficialWatershedParams()) for x in xs], 1) / n * 1e3,
        "smooth_watershed_ms": best_of(lambda: [smooth_watershed(x, SmoothWatershedParams()) for x in xs], 1) / n * 1e3,
        "maps_to_instances_ms": best_of(lambda: [instances_from_maps(m, PostParams()) for m in maps], 2) / n * 1e3,
    }


def _merge_rounds(sp: np.ndarray, maps512: np.ndarray, image: np.ndarray, rounds: int, graph: bool) -> list[np.ndarray]:
    """Feature rows of `rounds` merge rounds of a slice's superpixels (each merging a matching of the quarter of pairs
    with the smallest intensity step): read off the region graph, or (the reference) off a fresh pass over the merged
    label map every round, as the merger did before the graph."""
    fg, lab, grad, out = FeatureGraph(sp, maps512, image), sp.astype(np.int64), gradient(image, GRAD_SIGMA), []
    for _ in range(rounds):
        pairs, x = fg.features(True) if graph else pair_features(lab, maps512, image, grad, None, True)
        out.append(x)
        m = matching(pairs, np.argsort(x[:, FEATURES.index("int_diff")], kind="stable")[: len(pairs) // 4])
        if graph:
            fg.merge(m)
        else:
            lab = merge_pairs(lab, m)
    return out


def bench_merging(xs: np.ndarray, ys: np.ndarray, rounds: int) -> dict:
    """Milliseconds per slice of a merger's rounds of pair features (the hybrid's superpixels of the stretched slice,
    network maps as features): the region graph vs a pass over the merged label map per round; identical rows?"""
    stretched = resolve(ContrastParams(window="auto"), xs, say=lambda _: None).stretch(xs)
    sps = [superpixels(x, SuperpixelParams(h=0.0075)) for x in stretched]
    maps = [upsample_maps(m.astype(np.float32), 512) for m in synthetic_maps(ys)]
    items = list(zip(sps, maps, stretched))
    n = len(items)
    runs = {g: [_merge_rounds(sp, m, x, rounds, g) for sp, m, x in items] for g in (True, False)}
    same = all(np.array_equal(a, b, equal_nan=True) for ga, gb in zip(runs[True], runs[False]) for a, b in zip(ga, gb))
    graph = best_of(lambda: [_merge_rounds(sp, m, x, rounds, True) for sp, m, x in items], 2) / n * 1e3
    reread = best_of(lambda: [_merge_rounds(sp, m, x, rounds, False) for sp, m, x in items], 1) / n * 1e3
    return {"rounds": rounds, "superpixels": float(np.mean([s.max() for s in sps])), "graph_ms": graph, "reread_ms": reread,
            "speedup": reread / graph, "identical": bool(same)}  # fmt: skip


def bench_inference(xs: np.ndarray, quick: bool) -> dict:
    """Milliseconds per slice of each backbone's forward pass (no TTA) at its experiment's working resolution."""
    import torch


    names = ["unet_cpu"] if quick else sorted(p.stem for p in EXPERIMENTS.glob("unet_*.yaml") if "_mim" not in p.stem and "_vicregl" not in p.stem)
    out = {}
    for name in names:
        exp = load_experiment(name)
        model = build_model(replace(exp.params.model, encoder_weights="none"))
        res = exp.params.train.resolution
        predict_maps(model, xs[:2], res)  # warm-up (allocations, cuDNN autotune)
        n = len(xs)
        t = best_of(lambda m=model: predict_maps(m, xs, res, batch_size=8), 1 if quick else 2)
        out[name] = {"encoder": exp.params.model.encoder, "resolution": res, "ms_per_slice": t / n * 1e3, "device": str(device())}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def bench_tuning(ys: np.ndarray, xs: np.ndarray, trials: int, tmp: Path) -> dict:
    """Optuna trials per minute on synthetic OOF maps (SQLite study, every core scoring images)."""

    maps = synthetic_maps(ys)
    n = len(ys)
    member = RunMaps(tmp / "bench_run", np.arange(n), np.arange(n) % 2, maps, PostParams(), {})
    oof = OOF([member], xs, ys)
    spec = EnsembleSpec(name="bench", members=[MemberRef(str(member.run), 1.0)])
    t = time.perf_counter()
    r = tune(spec, oof, tmp, trials=trials, merge=False)
    minutes = (time.perf_counter() - t) / 60
    return {"images": n, "trials": r.trials_complete, "trials_per_minute": r.trials_per_minute, "wall_minutes_incl_final_scoring": minutes}



def gpu_configs() -> list[str]:
    """The GPU-sized segmentation experiments (unet_* without the _cpu sizes and pretraining variants)."""

    return sorted(p.stem for p in EXPERIMENTS.glob("unet_*.yaml") if "_cpu" not in p.stem)


def _train_rate(model, cfg, xs: np.ndarray, ys: np.ndarray, steps: int, dev) -> float:
    """Training images per second of the device alone: `steps` optimiser steps cycling over 4 batches staged on it
    beforehand (after 2 warm-up steps). The loader's cost is measured apart (speed.pipeline_ms): timing steps fed by
    it measured the workers, not the GPU."""
    import torch


    amp = Amp(dev, cfg.amp)
    data = SliceSet(xs, ys, cfg.resolution, cfg.aug, 0, cfg.crop, on_device=cfg.augment_on == "device")
    loader, _ = make_loader(data, replace(cfg, num_workers=0), torch.Generator().manual_seed(0), dev.type == "cuda")
    staged = [{k: v if k == "noise_seed" else v.to(dev) for k, v in b.items()} for b, _ in zip(loader, range(4))]
    loss_of = step_loss(model, cfg, amp, dev)
    opt = make_optimizer(model, cfg)
    model.train()
    done, t0 = 0, 0.0
    for i in range(steps + 2):
        batch = dict(staged[i % len(staged)])  # a copy: the device augmentation takes its keys out
        if i == 2:  # warm-up over (allocations, cuDNN autotuning): start the clock
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _ = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(opt)
        amp.scaler.update()
        done += len(staged[i % len(staged)]["image"]) if i >= 2 else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def bench_gpu(dry_run: bool = False, steps: int = 30, out: Path = Path("bench_gpu.json")) -> dict:
    """Each GPU config: the device's training and inference images/s on staged batches, peak GPU memory; the CPU side
    per item at the config's sizes (loader sample, quantisation, post-processing); and the `make cv` projection.

    `dry_run`: the device path on whatever device there is, tiny (64 px, batch 2, 2 steps): checks, not figures; the
    projection then takes the GPU rates from speed.GPU_ESTIMATE (an estimate) beside the CPU terms measured here."""
    import torch


    dev = device()
    if dev.type != "cuda" and not dry_run:
        raise UserError("bench --gpu", "no CUDA GPU on this machine: run it on the GPU box (`python -m comp bench --gpu --dry-run` checks the path here)")
    xs, ys = sample_slices(8 if dry_run else 64)
    steps = 2 if dry_run else steps
    results = {"device": describe(dev), "dry_run": dry_run, "steps": steps, "configs": {}}
    for name in gpu_configs():
        exp = load_experiment(name)
        cfg = replace(exp.params.train, resolution=64, crop=0, batch_size=2, num_workers=0, device="auto") if dry_run else exp.params.train
        model = build_model(replace(exp.params.model, encoder_weights="none"))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_ips = _train_rate(model, cfg, xs, ys, steps, dev)
        n = len(xs) if not dry_run else 4
        predict_maps(model, xs[:2], cfg.resolution, cfg.batch_size, amp=cfg.amp)  # warm-up
        plain = n / best_of(lambda m=model: predict_maps(m, xs[:n], cfg.resolution, cfg.batch_size, amp=cfg.amp), 1)
        tta = n / best_of(lambda m=model: predict_maps(m, xs[:n], cfg.resolution, cfg.batch_size, tta=True, amp=cfg.amp), 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        cpu = cpu_terms(exp, xs, ys, quick=dry_run)
        rates = (GPU_ESTIMATE["train_images_per_s"], GPU_ESTIMATE["infer_images_per_s"], GPU_ESTIMATE["infer_images_per_s"] / 3) if dry_run else (train_ips, plain, tta)
        proj = project(exp, *rates, cpu["sample_ms"], cpu["quantise"]["ours_ms"], cpu["post_ms"], estimate=dry_run)
        results["configs"][name] = {"resolution": cfg.resolution, "crop": cfg.crop, "batch_size": cfg.batch_size, "amp": cfg.amp,
                                    "train_images_per_s": train_ips, "infer_images_per_s": plain, "infer_tta_images_per_s": tta,
                                    "peak_gpu_gib": peak, "cpu": cpu, "projection": {**asdict(proj), "total_s": proj.total_s, "gpu_s": proj.gpu_s}}  # fmt: skip
        result(f"{name:<16} {cfg.resolution:>4} px  train {train_ips:8.1f} img/s  infer {plain:8.1f} / TTA {tta:7.1f} img/s  "
              f"peak {'%.1f GiB' % peak if peak is not None else '—':>9}\n  CPU per item: loader sample {cpu['sample_ms']:.1f} ms "
              f"({exp.params.train.augment_on} augmentation), quantisation {cpu['quantise']['ours_ms']:.1f} ms, post-processing "
              f"{cpu['post_ms']:.1f} ms\n  make cv ({exp.cv.folds} folds, 400 annotated + 500 test slices, one GPU):\n{proj.describe()}")  # fmt: skip
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_text(out, json.dumps(results, indent=1))
    result(f"{'DRY RUN (tiny sizes on this device; GPU rates in the projection are estimates). ' if dry_run else ''}{results['device']}; written to {out}")
    return results


def _quantised_pair(i: int, oof, post) -> tuple[float, float]:
    """One OOF image's ARI from its cached maps as stored and after a uint8 quantise/decode round trip."""

    maps, image, truth, fold = oof.item(i, [0])
    decoded = MapArray(*quantise(maps[0][None]))[0]  # the stored form, decoded as every reader does
    return image_score(truth, segment(maps[0], image, post)), image_score(truth, segment(decoded, image, post))


def bench_quantisation(runs: list[Path], data, workers: int = 0) -> dict:
    """OOF ARI of runs' own post-processing on their cached maps and on the same maps uint8-quantised."""

    out = {}
    for run in runs:
        oof = OOF.load([run], data)
        pairs = np.array(pmap(_quantised_pair, list(range(len(oof.images))), oof, oof.members[0].post, workers=workers, desc=run.name))
        out[oof.members[0].label] = {"images": len(pairs), "ari_stored": float(pairs[:, 0].mean()), "ari_uint8": float(pairs[:, 1].mean()),
                                     "max_abs_image_diff": float(np.abs(pairs[:, 0] - pairs[:, 1]).max())}  # fmt: skip
        r = out[oof.members[0].label]
        result(f"{r['images']:>4} images  stored {r['ari_stored']:.4f}  uint8 {r['ari_uint8']:.4f}  "
              f"(diff {r['ari_uint8'] - r['ari_stored']:+.4f}, max per image {r['max_abs_image_diff']:.4f})  {oof.members[0].label}")
    return out


def bench_gpu_cpu_side(xs: np.ndarray, ys: np.ndarray, quick: bool, name: str = "unet_resnet34") -> dict:
    """What a GPU config's run costs the CPU per item (speed.cpu_terms), measured here: loader sample (host and device
    augmentation), quantisation and post-processing per slice."""

    exp = load_experiment(name)
    return {"config": name, "resolution": exp.params.train.resolution, "crop": exp.params.train.crop, **cpu_terms(exp, xs, ys, quick)}


def run_bench(quick: bool = False, out: Path = Path("bench.json")) -> dict:
    """Run every benchmark, print a table and write `out`."""
    xs, ys = sample_slices(8 if quick else 48)
    with tempfile.TemporaryDirectory() as d:
        results = {
            "quick": quick,
            "metric": bench_metric(ys),
            "csv": bench_csv(ys, 40 if quick else 2000, 20 if quick else 500, Path(d)),
            "postprocess": bench_postprocess(xs[:4], ys[:4]) if quick else bench_postprocess(xs[:16], ys[:16]),
            "merging": bench_merging(xs[:2], ys[:2], 4) if quick else bench_merging(xs[:8], ys[:8], 16),
            "inference": bench_inference(xs[:4] if quick else xs[:16], quick),
            "tuning": bench_tuning(ys[:4], xs[:4], 3, Path(d)) if quick else bench_tuning(ys[:40], xs[:40], 12, Path(d)),
            "submit_memory": bench_submit_memory(8 if quick else 500, 3, Path(d), res=64 if quick else 256),
            "gpu_run_cpu_side": bench_gpu_cpu_side(xs, ys, quick),
        }
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic_write_text(out, json.dumps(results, indent=1))
    m, c, p = results["metric"], results["csv"], results["postprocess"]
    result(f"{'benchmark':<38} {'ours':>10} {'reference':>10} {'speedup':>8}")
    result(f"{'metric per image (ms) vs sklearn':<38} {m['ours_ms']:>10.2f} {m['sklearn_ms']:>10.2f} {m['speedup']:>7.1f}x")
    result(f"  max |ours - sklearn| = {m['max_abs_diff']:.2e}")
    result(f"{'read Y (' + str(c['read_columns']) + ' cols, s) vs read_csv':<38} {c['read_ours_s']:>10.2f} "
        f"{c['read_pandas_s']:>10.2f} {c['read_speedup']:>7.1f}x")
    result(f"{'write sub (' + str(c['write_columns']) + ' cols, s) vs to_csv':<38} {c['write_ours_s']:>10.2f} "
        f"{c['write_pandas_s']:>10.2f} {c['write_speedup']:>7.1f}x")
    result(f"  identical content: read {c['read_identical']}, write {c['write_identical']} (bytes {c['write_bytes_identical']})")
    for k, v in p.items():
        result(f"{'postprocess ' + k + ' per slice':<38} {v:>10.1f}")
    mg = results["merging"]
    result(f"{str(mg['rounds']) + ' merge rounds (ms/slice) vs re-read':<38} {mg['graph_ms']:>10.1f} {mg['reread_ms']:>10.1f} "
           f"{mg['speedup']:>7.1f}x  [{mg['superpixels']:.0f} superpixels; identical rows: {mg['identical']}]")  # fmt: skip
    for name, v in results["inference"].items():
        result(f"{'inference ' + name + ' (' + str(v['resolution']) + ' px, ms/slice)':<38} {v['ms_per_slice']:>10.1f}  [{v['device']}]")
    tu = results["tuning"]
    result(f"{'tuning trials per minute (' + str(tu['images']) + ' images)':<38} {tu['trials_per_minute']:>10.1f}")
    sm = results["submit_memory"]
    result(f"{'submit --ensemble peak memory (MB)':<38} {sm['peak_pss_mb']:>10.0f}  [{sm['test_slices']} slices, {sm['members']} members x 3 folds]")
    g = results["gpu_run_cpu_side"]
    result(f"{'loader sample, ' + g['config'] + ' (ms): host / device':<38} {g['pipeline']['host_ms']:>10.1f} {g['pipeline']['device_ms']:>10.1f}"
          f"  [{g['resolution']} px, crop {g['crop']}; device = the workers' share]")  # fmt: skip
    t = g["targets"]
    result(f"{'targets ' + str(t['size']) + ' px crop (ms); EDT edt vs scipy':<38} {t['targets_ms']:>10.1f} {t['edt_ms']:>10.1f} {t['scipy_edt_ms']:>10.1f}")
    q = g["quantise"]
    result(f"{'quantise ' + str(q['channels']) + ' ch x ' + str(q['resolution']) + ' px (ms/slice)':<38} {q['ours_ms']:>10.1f} {q['reference_ms']:>10.1f} "
          f"{q['reference_ms'] / q['ours_ms']:>7.1f}x")  # fmt: skip
    result(f"{'post-process ' + str(g['resolution']) + ' px maps (ms/slice)':<38} {g['post_ms']:>10.1f}")
    result(f"{'peak memory (MB)':<38} {results['peak_rss_mb']:>10.0f}")
    result(f"written to {out}")
    return results


def _tree_rss_mb(pid: int) -> float:
    """Memory of a process and all its descendants (Linux /proc), in MB: proportional set size, so pages that forked
    workers share with their parent are counted once (resident set size where the kernel gives no PSS)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            except (FileNotFoundError, StopIteration):
                with open(f"/proc/{p}/status") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total / 1024


def bench_submit_memory(n_test: int, members: int, tmp: Path, res: int = 256, emb: int = 8) -> dict:
    """Peak memory (PSS of the whole process tree) of `submit --ensemble --cached` over n_test slices and `members` runs."""
    import os
    import subprocess
    import sys


    xs, ys = sample_slices(12)
    root = tmp / "submem"
    write_images(root / "X_train", xs[:2])
    write_label_csv(root / "Y_train.csv", ys[:2], image_names(2))
    write_images(root / "X_test", np.stack([xs[i % len(xs)] for i in range(n_test)]))
    maps = synthetic_maps(ys, res, emb)
    fingerprint = Dataset(root).fingerprint()  # the cached test maps' slices: what `--cached` checks
    runs = tmp / "runs"
    refs = []
    for m in range(members):
        run = RunDir(runs / f"member{m}" / f"20260101-000000-0000000{m}-000000-k3")
        run.write_config({"name": f"member{m}", "method": "unet", "params": {}, "cv": {"folds": 3}, "data": fingerprint})
        run.write_summary({})
        save_maps(run.oof_maps_file(0), maps[:1])  # marks a map-predicting run
        if m == 0:  # one cached test-map file per fold, shared by every member (disk, not memory, is the limit here)
            for f in range(3):
                write_maps(run.test_maps_file(f), n_test, lambda sl: maps[np.arange(sl.start, sl.stop) % len(maps)], chunk=32)
        else:
            run.test_maps_file(0).parent.symlink_to(RunDir(Path(refs[0].run)).test_maps_file(0).parent.resolve())
        refs.append(MemberRef(str(run.path), 1.0 / members))
    save_ensemble(EnsembleSpec(name="submem", members=refs), runs)
    cmd = [sys.executable, "-m", "comp", "submit", "--ensemble", "submem", "--cached", "--data", str(root), "--runs", str(runs),
           "--out", str(tmp / "submem.csv")]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mb(proc.pid))
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"submit failed: {output[-2000:]}")
    return {"test_slices": n_test, "members": members, "folds": 3, "map_shape": list(maps.shape[1:]),
            "peak_pss_mb": peak, "seconds": time.perf_counter() - t}  # fmt: skip
