"""What a GPU run costs on the CPU, item by item (loader sample, quantised slice, post-processed slice), and the
`make cv` projection that puts those beside the GPU's rates: `make bench` and `make bench-gpu` both report them."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import edt
import numpy as np
from scipy import ndimage as ndi

from comp.core.store import quantise
from comp.data.phantom import render_slice
from comp.nets.models import EMB0
from comp.nets.targets import instances_from_maps, make_targets, resize_labels
from comp.nets.train import SliceSet

N_ANNOTATED, N_TEST = 400, 500  # the challenge: what `make cv` projections are for
BOX_CPUS = 16  # a GPU box's cores in the projection (the lent H200 machine has 16)
# Images per second of one H100-class card (bf16) for the GPU configs: ESTIMATES until `make bench-gpu` measures
# them. Training: the review of the CUDA path put a ResNet-34 U-Net at 384 px crops at 550-650; inference at
# 512 px: a forward pass is about a third of a training step's work per pixel, on 1.8x the pixels of a crop.
GPU_ESTIMATE = {"train_images_per_s": 600.0, "infer_images_per_s": 1000.0}


def sample_slices(n: int, distinct: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """n phantom (image, label) pairs, `distinct` of them rendered and the rest repeated."""
    pairs = [render_slice(10_000 + i) for i in range(min(n, distinct))]
    xs = np.stack([pairs[i % len(pairs)][0] for i in range(n)])
    ys = np.stack([pairs[i % len(pairs)][1] for i in range(n)])
    return xs, ys


def synthetic_maps(ys: np.ndarray, res: int = 256, emb: int = 8) -> np.ndarray:
    """Map stacks shaped like a trained network's output (blurred truth-derived fg/boundary/dist)."""
    out = np.zeros((len(ys), 3 + emb, res, res), np.float16)
    for i, y in enumerate(ys):
        t = make_targets(resize_labels(y, res))
        out[i, 0] = ndi.gaussian_filter(t.fg.astype(np.float32), 1.0)
        out[i, 1] = ndi.gaussian_filter(t.boundary.astype(np.float32), 0.7)
        out[i, 2] = t.dist
    return out


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _per_item_ms(fn, items: list, repeat: int = 2) -> float:
    """Best of `repeat` passes of fn over items, in milliseconds per item."""
    return best_of(lambda: [fn(it) for it in items], repeat) / len(items) * 1e3


def pipeline_ms(train, xs: np.ndarray, ys: np.ndarray, n: int = 16) -> dict[str, float]:
    """One loader sample (augmentation + targets) of a training config, host path and device path (the workers'
    share: geometry drawn, labels warped, targets), in ms at the config's resolution and crop."""
    out = {}
    for where in ("host", "device"):
        data = SliceSet(xs, ys, train.resolution, train.aug, 0, train.crop, on_device=where == "device")
        data[0]  # warm-up
        out[f"{where}_ms"] = _per_item_ms(data.__getitem__, list(range(1, n + 1)), repeat=1)
    return out


def targets_ms(ys: np.ndarray, size: int) -> dict[str, float]:
    """Training targets of one size x size crop (ours), and their distance transform alone: edt (ours) and scipy's."""
    crops = [np.ascontiguousarray(resize_labels(y, max(size, 512))[:size, :size]) for y in ys]
    inside = [(t.fg > 0) & (t.boundary == 0) for t in map(make_targets, crops)]
    return {"targets_ms": _per_item_ms(make_targets, crops), "edt_ms": _per_item_ms(lambda m: edt.edt(m, black_border=False, parallel=1), inside),
            "scipy_edt_ms": _per_item_ms(ndi.distance_transform_edt, inside), "size": size}  # fmt: skip


def quantise_ms(channels: int, res: int, n: int = 4) -> dict[str, float]:
    """Quantising one slice's maps (float16, as predicted) to the uint8 cache: ours and the plain definition."""
    def reference(m: np.ndarray) -> None:
        x = np.nan_to_num(np.asarray(m, np.float32))  # the first version: whole-array passes and fresh arrays
        lo, hi = x.min(axis=(2, 3)), x.max(axis=(2, 3))
        step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        np.clip(np.rint((x - lo[..., None, None]) / step[..., None, None]), 0, 255).astype(np.uint8)

    maps = [np.random.default_rng(i).random((1, channels, res, res), np.float32).astype(np.float16) for i in range(n)]
    return {"ours_ms": _per_item_ms(quantise, maps), "reference_ms": _per_item_ms(reference, maps), "channels": channels, "resolution": res}


def post_ms(post, ys: np.ndarray, res: int, emb: int) -> float:
    """Maps -> instances per slice (one core) for maps at working resolution `res`."""
    maps = synthetic_maps(ys, res=res, emb=emb)
    return _per_item_ms(lambda m: instances_from_maps(m, post), list(maps))


@dataclass
class Projection:
    """`make cv` of one experiment on one GPU, term by term, in seconds (400 annotated and 500 test slices)."""

    train_gpu_s: float  # optimiser steps on the GPU
    train_cpu_s: float  # the loader workers' samples; runs beside the GPU, so training takes the larger of the two
    val_gpu_s: float  # validation forward passes
    val_post_s: float  # validation maps -> instances in worker processes
    predict_gpu_s: float  # OOF and test maps (with TTA if the config has it)
    quantise_s: float  # maps -> uint8 cache, in the main process
    post_s: float  # OOF maps -> instances for scoring, in worker processes
    estimate: bool  # GPU rates assumed (GPU_ESTIMATE), not measured
    overlap: bool = True  # loader workers build batches while the GPU steps (num_workers 0: one after the other)

    @property
    def total_s(self) -> float:
        """Wall time: training overlapped with its loader, the rest one after another."""
        train = max(self.train_gpu_s, self.train_cpu_s) if self.overlap else self.train_gpu_s + self.train_cpu_s
        return train + self.val_gpu_s + self.val_post_s + self.predict_gpu_s + self.quantise_s + self.post_s

    @property
    def gpu_s(self) -> float:
        """Time the GPU is busy."""
        return self.train_gpu_s + self.val_gpu_s + self.predict_gpu_s

    def describe(self) -> str:
        """The projection and its terms, one line each, with which side bounds training."""
        side = "GPU" if self.train_gpu_s >= self.train_cpu_s else "CPU (loader workers)"
        terms = [f"  {k[:-2].replace('_', ' '):<12} {v:8.1f} s" for k, v in asdict(self).items() if k.endswith("_s")]
        head = (f"  {'ESTIMATE' if self.estimate else 'measured'}: {self.total_s / 60:.1f} min, GPU busy {self.gpu_s / 60:.1f} min "
                f"({self.gpu_s / self.total_s:.0%}); training bound by the {side}")  # fmt: skip
        return "\n".join([head, *terms])


def project(exp, train_ips: float, infer_ips: float, infer_tta_ips: float, sample_ms: float, quant_ms: float,
            post_ms_: float, cpus: int = BOX_CPUS, estimate: bool = False) -> Projection:  # fmt: skip
    """The projection from per-item costs: GPU rates (images/s), CPU ms per loader sample / quantised / post-processed slice."""
    p, k = exp.params, exp.cv.folds
    fit = N_ANNOTATED * (k - 1) / k - p.val_images
    loaders = min(p.train.num_workers, cpus - 1)  # train.loader_workers on that box
    rounds = p.train.epochs / p.train.val_every if p.val_images else 0
    predicted = k * (N_ANNOTATED / k + N_TEST)
    return Projection(train_gpu_s=k * fit * p.train.epochs / train_ips, train_cpu_s=k * fit * p.train.epochs * sample_ms / 1e3 / max(loaders, 1),
                      val_gpu_s=k * rounds * p.val_images / infer_ips, val_post_s=k * rounds * p.val_images * post_ms_ / 1e3 / cpus,
                      predict_gpu_s=predicted / (infer_tta_ips if p.tta else infer_ips), quantise_s=predicted * quant_ms / 1e3,
                      post_s=N_ANNOTATED * post_ms_ / 1e3 / cpus, estimate=estimate, overlap=loaders > 0)  # fmt: skip


def cpu_terms(exp, xs: np.ndarray, ys: np.ndarray, quick: bool = False) -> dict:
    """The three CPU-side costs of an experiment at its own sizes (device-path samples where it augments on the device)."""
    train, res = exp.params.train, exp.params.train.resolution
    pipe = pipeline_ms(train, xs, ys, n=4 if quick else 16)
    return {"pipeline": pipe, "sample_ms": pipe["device_ms" if train.augment_on == "device" else "host_ms"],
            "targets": targets_ms(ys[: 2 if quick else 8], train.crop or res),
            "quantise": quantise_ms(EMB0 + exp.params.model.embedding_dim, res, n=2 if quick else 4),
            "post_ms": post_ms(exp.params.post, ys[: 2 if quick else 8], res, exp.params.model.embedding_dim)}  # fmt: skip
