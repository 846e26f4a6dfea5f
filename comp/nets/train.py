"""Training of the instance network on one fold: seeded, AMP on CUDA, checkpointed, resumable."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from comp.core.atomic import atomic_path, remove_stale_temps
from comp.core.errors import UserError
from comp.core.fields import added, bounded, identity, identity_of, setting
from comp.core.log import LOG
from comp.core.parallel import cpu_share
from comp.core.runtime import Amp, describe, device, seed_everything
from comp.core.store import FoldDir
from comp.nets.losses import LossConfig, instance_loss
from comp.nets.models import InstanceNet
from comp.nets.targets import AugConfig, augment, make_targets, resize_image, resize_labels
from comp.nets.warp import augment_batch, draw_warp, warp_labels


@dataclass
class TrainConfig:
    """Optimisation settings of one fold's training."""

    epochs: int = bounded(40, lo=1)
    batch_size: int = bounded(8, lo=1)
    resolution: int = bounded(256, lo=32, hi=512)  # working resolution; maps are resized back to 512 for post-processing
    crop: int = bounded(0, lo=0)  # train on random crops of this size at working resolution (0 = whole slices)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = bounded(1e-3, lo=0, lo_open=True)
    weight_decay: float = bounded(1e-4, lo=0)
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = bounded(1.0, lo=0)
    val_every: int = bounded(1, lo=1)
    amp: bool = True  # only on CUDA
    channels_last: bool = True  # only on CUDA
    num_workers: int = bounded(0, lo=0)  # loader processes, capped by this process's share of the CPUs (runtime.cpu_share)
    # Full checkpoints (model + optimiser, ~300 MB for a ResNet-34 U-Net) every this many epochs and always at the end;
    # a kill loses at most this many epochs. The best epoch's weights are written with them.
    checkpoint_every: int = bounded(1, lo=1, execution=True)
    budget: float = bounded(1.0, lo=0, hi=1, lo_open=True)  # fraction of the fold's annotated training images used (few-shot ablations)
    device: str = setting("auto")  # auto | cuda: a GPU-sized config says cuda and then refuses the CPU unless --device cpu
    deterministic: bool = False  # CUDA: deterministic kernels (slower); the CPU path is deterministic anyway
    # host: augmentation per sample with scipy in the loader (the CPU runs' path); device: geometry drawn and labels
    # warped on the host, the images warped and toned on the device in batch (data.warp; the GPU configs' path).
    augment_on: str = added("host")
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)

    def violations(self) -> dict[str, str]:
        """Relations `bounded` cannot say."""
        return {} if self.augment_on in ("host", "device") else {"augment_on": f"must be host or device, got {self.augment_on!r}"}


LOG_EVERY = 25  # steps between progress-bar loss updates: each one waits for the device


def run_epoch(loader, opt: torch.optim.Optimizer, amp: Amp, loss_fn, lr_at, first_step: int, desc: str) -> dict[str, float]:
    """One optimiser pass: per-step LR `lr_at(step)`, `loss_fn(batch) -> (loss, parts)`, scaled step; mean parts.

    The parts are summed on the device and read once at the end: no step waits for the GPU to catch up
    (a `float(loss)` per step would), except the progress bar's every LOG_EVERY steps."""
    from tqdm import tqdm

    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(loader, desc=desc, leave=False)
    for i, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(first_step + i)
        loss, parts = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(opt)
        amp.scaler.update()
        for k, v in parts.items():
            sums[k] = sums[k] + v if k in sums else v
        if (i + 1) % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return {k: float(v) / len(loader) for k, v in sums.items()}


class SliceSet(torch.utils.data.Dataset):
    """Annotated slices at working resolution with on-the-fly augmentation and targets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, res: int, aug: AugConfig | None, seed: int, crop: int = 0,
                 affine: tuple[float, float] = (1.0, 0.0), on_device: bool = False) -> None:  # fmt: skip
        # `affine` maps 0..1 grey to the contrast window's units (0..1 over the window, unclipped).
        self.x = np.stack([affine[0] * resize_image(i, res) + affine[1] for i in x]).astype(np.float32)
        self.y = np.stack([resize_labels(l, res) for l in y])
        self.aug = aug
        self.seed = seed
        self.crop = crop if 0 < crop < res else 0
        self.on_device = on_device  # the image is warped and toned by the loss step (data.warp.augment_batch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        # key = epoch * len + index (EpochBatches): loader workers hold a copy of this object, so the
        # epoch travels with each key. Seeded by (seed, epoch, index): the same samples with any worker count.
        epoch, i = divmod(int(key), len(self.x))
        img, lab = self.x[i], self.y[i]
        rng = np.random.default_rng((self.seed, epoch, i))
        extra = {}
        if self.on_device:
            warp, tone = draw_warp(self.aug, rng, len(img), self.crop or len(img))
            lab = warp_labels(lab, warp, self.crop or len(img))
            extra = {"warp": torch.from_numpy(warp), "tone": torch.from_numpy(tone), "noise_seed": torch.tensor(int(rng.integers(2**62)))}
        else:
            if self.aug is not None:
                img, lab = augment(img, lab, self.aug, rng)
            if self.crop:
                y0, x0 = rng.integers(0, len(img) - self.crop + 1, 2)
                img, lab = img[y0 : y0 + self.crop, x0 : x0 + self.crop], lab[y0 : y0 + self.crop, x0 : x0 + self.crop]
        t = make_targets(np.ascontiguousarray(lab))
        # Bytes for the masks and ids (12 bytes a pixel with the image and distance, against 28 as float32/int64):
        # what crosses /dev/shm from the workers and the PCIe bus to the GPU; the loss converts them there.
        return {"image": torch.from_numpy(np.ascontiguousarray(img))[None], "fg": torch.from_numpy(t.fg),
                "boundary": torch.from_numpy(t.boundary), "touch": torch.from_numpy(t.touch), "dist": torch.from_numpy(t.dist),
                "instances": torch.from_numpy(t.instances), **extra}  # fmt: skip


class EpochBatches(torch.utils.data.Sampler):
    """Batches of keys (epoch * n + index) for every epoch from `start` to `epochs`, each epoch one shuffled pass drawn
    from `generator` (a short last batch dropped if asked, never one that spans two epochs).

    One iterator for the whole fold: loader workers run on into the next epoch (and through validation) instead of
    starting cold each epoch. The draws are those of one pass per epoch, and `state_before(e)` is the generator's
    state before epoch e's pass, which a checkpoint keeps even when the workers have already drawn further."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, generator: torch.Generator, epochs: int, start: int = 0) -> None:
        self.n, self.batch_size, self.generator, self.epochs, self.start = n, batch_size, generator, epochs, start
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._states: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return (self.epochs - self.start) * self.per_epoch

    def __iter__(self):
        for epoch in range(self.start, self.epochs):
            self._states[epoch] = self.generator.get_state()
            keys = (epoch * self.n + torch.randperm(self.n, generator=self.generator)).tolist()
            for b in range(self.per_epoch):
                yield keys[b * self.batch_size : (b + 1) * self.batch_size]

    def state_before(self, epoch: int) -> torch.Tensor:
        """The generator's state before epoch `epoch`'s pass (now, if the pass is not drawn yet)."""
        return self._states.pop(epoch) if epoch in self._states else self.generator.get_state()


class EpochSlice:
    """The next `n` items of an iterator, with a length (an epoch's batches out of the fold's one stream)."""

    def __init__(self, stream, n: int) -> None:
        self.stream, self.n = stream, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.stream, self.n)


def eta_line(epoch_seconds: float, epochs_left: int, epochs: int, folds_left: int) -> str:
    """'ETA: this fold ~X min, the run ~Y min' from the first epoch's time (validation included)."""
    fold = epoch_seconds * epochs_left / 60
    line = f"ETA: this fold ~{fold:.1f} min"
    if folds_left:
        line += f", the run ~{fold + folds_left * epochs * epoch_seconds / 60:.1f} min ({folds_left} more folds)"
    return line


def lr_factor(step: int, total: int, warm: int, schedule: str = "cosine") -> float:
    """Learning-rate multiplier: linear warm-up over `warm` steps, then cosine decay or constant."""
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _plain(data: object) -> object:
    """Plain JSON data (tuples and lists alike), for comparing a stored config with a live one."""
    return json.loads(json.dumps(data))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temp file and rename: a kill never leaves a half-written checkpoint."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def loader_workers(asked: int) -> int:
    """Loader processes: as many as asked, but at most this process's CPU share less one (the training loop's):
    `make cv GPUS="0 1"` on 16 cores gives each of the two processes 7, not 8 + every core."""
    return min(asked, max(0, cpu_share() - 1))


def make_loader(data: SliceSet, cfg: TrainConfig, generator: torch.Generator, cuda: bool, start: int = 0) -> tuple[torch.utils.data.DataLoader, EpochBatches]:
    """The fed loader of a fold's epochs from `start` on: shuffled by `generator`, workers sized to the CPU share,
    pinned memory on CUDA; and its batch sampler (state_before for checkpoints)."""
    batches = EpochBatches(len(data), min(cfg.batch_size, len(data)), len(data) > cfg.batch_size, generator, cfg.epochs, start)
    workers = loader_workers(cfg.num_workers)
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=cuda,  # page-locked batches: the non-blocking copies overlap the previous step
    )
    if cuda and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input size: autotuned convolutions pay off after one step
    return loader, batches


def step_loss(model: InstanceNet, cfg: TrainConfig, amp: Amp, dev: torch.device):
    """Move the model to `dev` (channels-last on CUDA if asked); return batch -> (loss, detached parts)."""
    channels_last = dev.type == "cuda" and cfg.channels_last
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def loss_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "warp" in batch:  # augment_on: device
            batch = augment_batch(batch, dev)
        else:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        img = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        with amp.autocast():
            out = model(img)
        return instance_loss(out, batch, cfg.loss)

    return loss_of


def _training_set(x: np.ndarray, y: np.ndarray, budget: float, seed: int,
                  extra: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The annotated slices thinned to `budget` (seeded), then the pseudo-labelled ones (`extra`) added."""
    if budget < 1.0:
        keep = np.sort(np.random.default_rng(seed).permutation(len(x))[: max(1, round(budget * len(x)))])
        x, y = x[keep], y[keep]
    if extra is not None and len(extra[0]):
        LOG.info(f"training on {len(x)} annotated + {len(extra[0])} pseudo-labelled slices")
        x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
    return x, y


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict copied to the CPU: kept until the next checkpoint while training changes the live one."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _resume(last: Path, model: InstanceNet, opt: torch.optim.Optimizer, amp: Amp, g: torch.Generator,
            cfg: TrainConfig) -> tuple[int, float, list[dict]]:  # fmt: skip
    """Load last.pt into the model, optimiser, scaler and RNGs if it exists: (first epoch to run, best, history)."""
    if not last.exists():
        return 0, -math.inf, []
    # On the CPU and weights-only: RNG states must stay CPU tensors, and no pickle runs from a checkpoint.
    ck = torch.load(last, map_location="cpu", weights_only=True)
    if _plain(identity_of(TrainConfig, ck.get("config") or {})) != _plain(identity(cfg)):
        raise UserError(last, "checkpoint of another training config: delete this folder or use a new run")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    amp.load_scaler(ck.get("scaler"))
    torch.set_rng_state(ck["torch_rng"])
    g.set_state(ck["loader_rng"])
    LOG.info(f"resuming from {last} at epoch {ck['epoch'] + 1}")
    return ck["epoch"] + 1, ck["best"], ck["history"]


def _log_epoch(rec: dict, epochs: int, best: float, first: bool, folds_left: int) -> None:
    """The epoch's line (loss, validation ARI), and after the first epoch run the ETA."""
    msg = f"epoch {rec['epoch'] + 1}/{epochs} loss {rec['loss']:.4f}"
    if "val_ari" in rec:
        msg += f" val ARI {rec['val_ari']:.4f} (best {best:.4f})"
    LOG.info(msg + f" [{rec['seconds']} s]")
    if first and rec["epoch"] + 1 < epochs:
        LOG.info(eta_line(rec["seconds"], epochs - rec["epoch"] - 1, epochs, folds_left))


def _start(cfg: TrainConfig, seed: int) -> tuple[torch.device, Amp]:
    """The fold's device (refusing the CPU for a GPU-sized config), seeds, determinism and mixed precision, said in one line."""
    dev = device(cfg.device)
    seed_everything(seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    amp = Amp(dev, cfg.amp)
    LOG.info(f"training on {describe(dev)}" + (f", AMP {str(amp.dtype).split('.')[-1]}" if amp.enabled else ", no AMP"))
    return dev, amp


def _select(model: InstanceNet, validate, rec: dict, best: float, end: bool, every: int) -> tuple[float, dict | None]:
    """One epoch's validation and selection: the best score so far and the weights to keep (None: none new)."""
    epoch = rec["epoch"]
    if validate is not None and ((epoch + 1) % every == 0 or end):
        rec["val_ari"] = float(validate(model))
        if rec["val_ari"] > best:
            return rec["val_ari"], {"model": _cpu_copy(model.state_dict()), "epoch": epoch, "val_ari": rec["val_ari"]}
    elif validate is None and end:
        return best, {"model": model.state_dict(), "epoch": epoch}  # a fixed schedule keeps its last epoch
    return best, None


def train_fold(
    model: InstanceNet,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    workdir: Path,
    seed: int,
    validate=None,
    affine: tuple[float, float] = (1.0, 0.0),
    folds_left: int = 0,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Train on (x, y); `validate(model) -> ARI` picks the best epoch; `affine` is the contrast's. Resumes from workdir/last.pt.

    `extra` (pseudo-labelled slices) joins the training set after `budget` has thinned the annotated ones.

    After the first epoch it prints an ETA for this fold and, with `folds_left` more to come, for the run."""
    dev, amp = _start(cfg, seed)
    cuda = dev.type == "cuda"
    data = SliceSet(*_training_set(x, y, cfg.budget, seed, extra), cfg.resolution, cfg.aug, seed, cfg.crop, affine,
                    cfg.augment_on == "device")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    loss_of = step_loss(model, cfg, amp, dev)
    opt = make_optimizer(model, cfg)
    last, best_path = FoldDir(workdir).last, FoldDir(workdir).best
    for ck_path in (last, best_path):  # the fold is claimed: temps beside its checkpoints are a killed run's leftovers
        remove_stale_temps(ck_path)
    start, best, history = _resume(last, model, opt, amp, g, cfg)
    loader, batches = make_loader(data, cfg, g, cuda, start)
    per_epoch = batches.per_epoch
    total = cfg.epochs * per_epoch
    warm = int(cfg.warmup_epochs * per_epoch)
    stream = iter(loader) if start < cfg.epochs else iter(())
    pending = None  # the best epoch's weights (on the CPU) not yet written to best.pt
    for epoch in range(start, cfg.epochs):
        model.train()
        t0 = time.time()
        parts = run_epoch(EpochSlice(stream, per_epoch), opt, amp, loss_of, lambda step: cfg.lr * lr_factor(step, total, warm, cfg.schedule),
                          epoch * per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")  # fmt: skip
        rec = {"epoch": epoch, "loss": sum(parts.values()), **parts}
        end = epoch + 1 == cfg.epochs
        best, chosen = _select(model, validate, rec, best, end, cfg.val_every)
        pending = chosen if chosen is not None else pending
        rec["seconds"] = round(time.time() - t0, 1)
        history.append(rec)
        _log_epoch(rec, cfg.epochs, best, epoch == start, folds_left)
        if (epoch + 1) % cfg.checkpoint_every == 0 or end:
            if pending is not None:  # first: a resume from last.pt then finds the best it records
                save_checkpoint(best_path, pending)
                pending = None
            save_checkpoint(last, {"model": model.state_dict(), "opt": opt.state_dict(), "scaler": amp.scaler.state_dict(),
                                   "epoch": epoch, "best": best, "history": history, "torch_rng": torch.get_rng_state(),
                                   "loader_rng": batches.state_before(epoch + 1), "config": asdict(cfg)})  # fmt: skip
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    return {"best_val_ari": best if best > -math.inf else None, "history": history}
