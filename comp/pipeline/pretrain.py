"""Self-supervised pretraining of an encoder on slice pixels (never labels): masked modelling or dense VICReg.

`mim`: SparK/MAE-style masked image modelling for CNNs — patches are blanked, the encoder's
multi-scale features go through a light decoder, the loss is the reconstruction error on the
masked patches only.
`vicregl`: two views of a crop related by a known rot90/flip (so every feature location has its exact
partner) with independent intensity changes, noise and blanked patches; VICReg's invariance,
variance and covariance terms on pooled features (global) and on matched locations (local).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from comp.core.atomic import atomic_path, atomic_write_text, remove_stale_temps
from comp.core.errors import UserError
from comp.core.fields import bounded, identity, setting
from comp.core.figures import plot_curves
from comp.core.log import LOG
from comp.core.runtime import Amp, describe, device, seed_everything
from comp.core.store import FoldDir
from comp.data.contrast import Contrast, ContrastParams, resolve
from comp.nets.models import InstanceNet, ModelConfig, build_model
from comp.nets.targets import AugConfig, augment, resize_image
from comp.nets.train import EpochBatches, EpochSlice, loader_workers, lr_factor, run_epoch, save_checkpoint
from comp.pipeline.config import PRETRAIN_EXPERIMENTS, experiment_path, from_dict, raw_config
from comp.pipeline.workspace import RUNS, Workspace


@dataclass
class SSLConfig:
    """A pretraining experiment (experiments/pretrain/ssl_*.yaml)."""

    name: str = "ssl"
    description: str = ""
    method: str = "mim"  # mim | vicregl
    model: ModelConfig = field(default_factory=ModelConfig)
    resolution: int = bounded(256, lo=32, hi=512)
    crop: int = bounded(128, lo=32)
    epochs: int = bounded(20, lo=1)
    batch_size: int = bounded(16, lo=1)
    lr: float = bounded(1e-3, lo=0, lo_open=True)
    weight_decay: float = bounded(0.05, lo=0)
    warmup_epochs: float = bounded(1.0, lo=0)
    mask_ratio: float = bounded(0.6, lo=0, hi=1, lo_open=True, hi_open=True)
    patch: int = bounded(16, lo=1)  # masking patch size at working resolution
    local_weight: float = bounded(0.75, lo=0, hi=1)  # vicregl: share of the dense (local) term
    amp: bool = True
    num_workers: int = bounded(0, lo=0)  # DataLoader worker processes (augmentation off the training loop)
    device: str = setting("auto")  # auto | cuda: a GPU-sized config says cuda and then refuses the CPU unless --device cpu
    aug: AugConfig = field(default_factory=lambda: AugConfig(rotate_deg=10.0, scale=0.1))
    max_images: int = bounded(0, lo=0)  # 0 = every slice
    seed: int = bounded(0, lo=0)
    contrast: ContrastParams = field(default_factory=ContrastParams)  # same as the segmentation experiments it feeds


def load_ssl_config(name_or_path: str) -> SSLConfig:
    """Load and validate a pretraining YAML."""
    path = experiment_path(name_or_path, PRETRAIN_EXPERIMENTS)
    cfg = from_dict(SSLConfig, raw_config(path, PRETRAIN_EXPERIMENTS), str(path))
    if cfg.method not in PRETEXTS:
        raise UserError(path, f"unknown pretext method '{cfg.method}' (known: {', '.join(sorted(PRETEXTS))})")
    if cfg.crop % 32 or cfg.patch <= 0 or cfg.crop % cfg.patch:
        raise UserError(path, f"crop ({cfg.crop}) must be a multiple of 32 and of patch ({cfg.patch})")
    return cfg


class LightDecoder(nn.Module):
    """Multi-scale features -> a 1-channel image: project, upsample, sum, refine."""

    def __init__(self, channels: list[int], width: int = 32) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 1, 1))

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Sum of the projected features at stride 2, refined and upsampled to `size`."""
        target = feats[0].shape[-2:]
        x = sum(F.interpolate(p(f), size=target, mode="bilinear", align_corners=False) for p, f in zip(self.proj, feats))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


def _features(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's feature maps, strides 2 to 32 (smp encoders return the input itself first)."""
    return list(encoder(x))[1:]


def patch_mask(b: int, size: int, patch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) float mask, 1 on blanked patches, drawn on the generator's device (no host copy)."""
    n = size // patch
    m = (torch.rand(b, 1, n, n, generator=gen, device=gen.device) < ratio).float()
    return F.interpolate(m, scale_factor=patch, mode="nearest")


class MaskedModelling(nn.Module):
    """Encoder + light decoder; loss on masked patches only."""

    def __init__(self, model: InstanceNet, cfg: SSLConfig) -> None:
        super().__init__()
        self.encoder, self.stem = model.encoder, model.stem
        with torch.no_grad():
            chans = [f.shape[1] for f in _features(self.encoder, self.stem(torch.zeros(1, 1, cfg.crop, cfg.crop)))]
        self.decoder = LightDecoder(chans)
        self.cfg = cfg

    def loss(self, x: torch.Tensor, gen: torch.Generator, host: torch.Generator) -> torch.Tensor:
        """Reconstruction MSE of the blanked patches (drawn from `gen`, on x's device)."""
        m = patch_mask(len(x), x.shape[-1], self.cfg.patch, self.cfg.mask_ratio, gen)
        fill = x.mean(dim=(2, 3), keepdim=True)
        rec = self.decoder(_features(self.encoder, self.stem(x * (1 - m) + fill * m)), x.shape[-2:])
        target = x.clamp(0, 1)  # the main window, as the stem's first channel shows it
        return (((rec.float() - target) ** 2) * m).sum() / m.sum().clamp(min=1)


def vicreg_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """VICReg loss of two (N, D) batches of paired embeddings (25 / 25 / 1 weighting)."""
    inv = F.mse_loss(a, b)
    var = cov = a.new_zeros(())
    for z in (a, b):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        var = var + F.relu(1 - std).mean()
        c = (z.T @ z) / max(len(z) - 1, 1)
        off = c - torch.diag(torch.diag(c))
        cov = cov + (off**2).sum() / z.shape[1]
    return 25 * inv + 25 * var + cov


class DenseVICReg(nn.Module):
    """Encoder + projectors; global and location-matched VICReg terms between two views."""

    def __init__(self, model: InstanceNet, cfg: SSLConfig, dim: int = 128) -> None:
        super().__init__()
        self.encoder, self.stem = model.encoder, model.stem
        with torch.no_grad():
            c = _features(self.encoder, self.stem(torch.zeros(1, 1, cfg.crop, cfg.crop)))[-2].shape[1]
        self.local = nn.Sequential(nn.Conv2d(c, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))
        self.glob = nn.Sequential(nn.Linear(c, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.cfg = cfg

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = _features(self.encoder, self.stem(x))[-2]  # stride 16: fine enough for dense correspondence
        return self.glob(f.mean(dim=(2, 3))), self.local(f)

    def loss(self, x: torch.Tensor, gen: torch.Generator, host: torch.Generator) -> torch.Tensor:
        """Views: x and a rot90/flip of x, each with its own noise, contrast and blanked patches. The geometry comes
        from the CPU generator `host` (it picks kernels); masks, gains and noise from `gen`, on x's device."""
        k = int(torch.randint(4, (1,), generator=host))
        flip = bool(torch.randint(2, (1,), generator=host))

        def perturb(v: torch.Tensor) -> torch.Tensor:
            m = patch_mask(len(v), v.shape[-1], self.cfg.patch, self.cfg.mask_ratio / 2, gen)
            gain = 1 + 0.2 * (torch.rand(len(v), 1, 1, 1, generator=gen, device=gen.device) - 0.5)
            noise = 0.03 * torch.randn(v.shape, generator=gen, device=gen.device)
            return (v * gain + noise) * (1 - m) + v.mean() * m

        va = perturb(x)
        vb = perturb(torch.rot90(x.flip(-1) if flip else x, k, dims=(2, 3)))
        ga, la = self._embed(va)
        gb, lb = self._embed(vb)
        lb = torch.rot90(lb, -k, dims=(2, 3))  # undo the geometry: locations now correspond
        lb = lb.flip(-1) if flip else lb
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
        w = self.cfg.local_weight
        return (1 - w) * vicreg_terms(ga.float(), gb.float()) + w * vicreg_terms(flat(la).float(), flat(lb).float())


PRETEXTS = {"mim": MaskedModelling, "vicregl": DenseVICReg}
# How the pretexts draw their masks and noise, part of a pretraining's identity: checkpoints made with the older draws
# (from the sampler's CPU generator) are not resumed as if they were these.
PRETEXT_DRAWS = "device-generator"


class CropSet(torch.utils.data.Dataset):
    """Random crops of slices at working resolution, with the CT augmentations (no labels)."""

    def __init__(self, x: np.ndarray, cfg: SSLConfig, affine: tuple[float, float] = (1.0, 0.0)) -> None:
        self.x = np.stack([affine[0] * resize_image(i, cfg.resolution) + affine[1] for i in x]).astype(np.float32)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int) -> torch.Tensor:
        epoch, i = divmod(int(key), len(self.x))  # keys from EpochBatches carry the epoch (see train.SliceSet)
        rng = np.random.default_rng((self.cfg.seed, epoch, i))
        img, _ = augment(self.x[i], np.zeros(self.x[i].shape, np.uint8), self.cfg.aug, rng)
        c = self.cfg.crop
        if c < len(img):
            # Crops centred on the body more often than on air: pick among a few by mean intensity.
            cands = rng.integers(0, len(img) - c + 1, (4, 2))
            y0, x0 = max(cands, key=lambda p: float(img[p[0] : p[0] + c, p[1] : p[1] + c].mean()))
            img = img[y0 : y0 + c, x0 : x0 + c]
        return torch.from_numpy(np.ascontiguousarray(img))[None]


def _resume(last: Path, task: nn.Module, opt: torch.optim.Optimizer, amp: Amp, gens: dict[str, torch.Generator]) -> tuple[int, list[dict]]:
    """Load last.pt into the pretext model, optimiser, scaler and generators if it exists: (first epoch to run, history)."""
    if not last.exists():
        return 0, []
    ck = torch.load(last, map_location="cpu", weights_only=True)  # CPU RNG states; no pickle from a checkpoint
    task.load_state_dict(ck["task"])
    opt.load_state_dict(ck["opt"])
    amp.load_scaler(ck.get("scaler"))
    for name, g in gens.items():
        g.set_state(ck[name])
    LOG.info(f"resuming from {last} at epoch {ck['epoch'] + 1}")
    return ck["epoch"] + 1, ck["history"]


def pretrain(cfg: SSLConfig, x: np.ndarray, out_dir: Path, contrast: Contrast = Contrast()) -> Path:
    """Pretrain the encoder on slices `x` behind the contrast step; resumable from out_dir/last.pt; returns the encoder checkpoint."""
    dev = device(cfg.device)
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.max_images and len(x) > cfg.max_images:
        x = x[np.random.default_rng(cfg.seed).permutation(len(x))[: cfg.max_images]]
    model = build_model(cfg.model, contrast.stem_windows())
    task = PRETEXTS[cfg.method](model, cfg).to(dev)
    data = CropSet(contrast.canonical(x), cfg, contrast.unit_affine())
    gen = torch.Generator().manual_seed(cfg.seed)
    cuda = dev.type == "cuda"
    if cuda:  # the segmentation training's layout and autotuning (fixed crop size)
        task.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    # Masks and noise from a generator on the device (no pageable host copy per step), the views' geometry from a CPU
    # one: neither is the sampler's, so loader workers prefetching permutations cannot shift the draws.
    gens = {"gen": gen, "host_gen": torch.Generator().manual_seed(cfg.seed + 1), "dev_gen": torch.Generator(device=dev).manual_seed(cfg.seed + 2)}
    opt = torch.optim.AdamW(task.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = Amp(dev, cfg.amp)
    LOG.info(f"pretraining on {describe(dev)}")
    last = FoldDir(out_dir).last
    for ck_path in (last, out_dir / "encoder.pt"):  # a killed pretraining's temps (one process per pretraining folder)
        remove_stale_temps(ck_path)
    start, history = _resume(last, task, opt, amp, gens)
    # One stream of batches over the remaining epochs, as in training (workers run on across epochs).
    batches = EpochBatches(len(data), min(cfg.batch_size, len(data)), True, gen, cfg.epochs, start)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=loader_workers(cfg.num_workers), pin_memory=cuda)
    per_epoch, total = batches.per_epoch, cfg.epochs * batches.per_epoch
    warm = int(cfg.warmup_epochs * per_epoch)
    stream = iter(loader) if start < cfg.epochs else iter(())

    def loss_of(xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xb = xb.to(dev, non_blocking=True)
        with amp.autocast():
            loss = task.loss(xb.contiguous(memory_format=torch.channels_last) if cuda else xb, gens["dev_gen"], gens["host_gen"])
        return loss, {"loss": loss.detach()}

    for epoch in range(start, cfg.epochs):
        task.train()
        t0 = time.time()
        parts = run_epoch(EpochSlice(stream, per_epoch), opt, amp, loss_of, lambda step: cfg.lr * lr_factor(step, total, warm),
                          epoch * per_epoch, f"pretrain {cfg.method} {epoch + 1}/{cfg.epochs}")  # fmt: skip
        history.append({"epoch": epoch, "loss": parts["loss"], "seconds": round(time.time() - t0, 1)})
        LOG.info(f"pretrain {cfg.method} epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['loss']:.4f} [{history[-1]['seconds']} s]")
        save_checkpoint(last, {"task": task.state_dict(), "opt": opt.state_dict(), "scaler": amp.scaler.state_dict(), "epoch": epoch, "history": history,
                               **{name: g.get_state() for name, g in gens.items()}, "gen": batches.state_before(epoch + 1)})  # fmt: skip
        save_checkpoint(out_dir / "encoder.pt", {"encoder": model.encoder.state_dict(), "config": asdict(cfg), "epoch": epoch})
    atomic_write_text(FoldDir(out_dir).history, json.dumps(history, indent=1))

    curve = ([h["epoch"] + 1 for h in history], [h["loss"] for h in history])
    plot_curves({"loss": curve}, out_dir / "loss.png", f"{cfg.name} ({cfg.method}, {cfg.model.encoder})", "loss")
    return out_dir / "encoder.pt"


def run_pretrain(cfg: SSLConfig, x: np.ndarray, data_key: str, runs: Path = RUNS) -> Path:
    """Pretrain into runs/pretrain/NAME/<config+data digest>/ and publish runs/pretrain/NAME.pt for YAMLs."""
    import hashlib

    digest = hashlib.sha1(json.dumps([identity(cfg), data_key, PRETEXT_DRAWS], sort_keys=True).encode()).hexdigest()[:10]
    ck = pretrain(cfg, x, Workspace(runs).pretrain_dir(cfg.name, digest), resolve(cfg.contrast, x, cfg.name))
    public = Workspace(runs).pretrained(cfg.name)

    with atomic_path(public, suffix=".pt") as tmp:
        shutil.copyfile(ck, tmp)
    return public
