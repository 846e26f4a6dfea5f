"""Augmentation split for a GPU run (`train.augment_on: device`): each sample's geometry and tone are drawn on the host
(seeded, as in `targets.augment`), its labels warped there by a nearest-pixel gather straight into the crop (the
targets need them), and the image warped and toned on the device for the whole batch at once.

The host path (`targets.augment`: scipy per slice) costs the workers about three times as much a 512 px sample and
caps a GPU's intake (`make bench` times both); this one leaves them the label gather and the targets. One warp convention for both sides: a (2, 3) matrix maps an
output crop pixel (row, col, 1) to the input pixel it samples, centres at integer coordinates."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from comp.nets.targets import SHARPEN_SIGMA, AugConfig, resolution_amount

NEUTRAL_TONE = (1.0, 1.0, 0.0, 0.0, 0.0)  # gamma exponent, contrast factor, brightness shift, noise sigma, resolution


def _dihedral(k: int, flip: bool) -> np.ndarray:
    """The (row, col) matrix of k quarter turns after an optional left-right flip."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][k % 4]
    turn = np.array([[c, -s], [s, c]], np.float64)
    return turn @ np.diag([1.0, -1.0 if flip else 1.0])


def draw_warp(aug: AugConfig | None, rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's warp (2, 3) from a `size` crop to an n x n slice, and its tone (4,): `aug`'s ranges, seeded by rng."""
    a, tone = np.eye(2), np.array(NEUTRAL_TONE)
    if aug is not None and rng.random() < aug.p:
        k = int(rng.integers(4)) if aug.rot90 else 0
        flip = bool(aug.flip and rng.random() < 0.5)
        th = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
        s = 1.0 + rng.uniform(-aug.scale, aug.scale)
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) / s
        a = _dihedral(k, flip) @ rot
        tone = np.array([math.exp(rng.uniform(-aug.gamma, aug.gamma)), 1 + rng.uniform(-aug.contrast, aug.contrast),
                         rng.uniform(-aug.brightness, aug.brightness), rng.uniform(0, aug.noise), 0.0])  # fmt: skip
        tone[4] = resolution_amount(aug, rng)
    origin = rng.integers(0, n - size + 1, 2) if size < n else np.zeros(2)
    centre = np.full(2, (n - 1) / 2)
    shift = a @ origin + centre - a @ centre  # output pixel o of the crop samples a @ (o + origin - centre) + centre
    return np.concatenate([a, shift[:, None]], 1).astype(np.float32), tone.astype(np.float32)


def _coords(warp: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input (row, col) coordinates sampled by each output pixel of the crop."""
    r = np.arange(size, dtype=np.float32)
    return (warp[0, 0] * r[:, None] + warp[0, 1] * r[None] + warp[0, 2],
            warp[1, 0] * r[:, None] + warp[1, 1] * r[None] + warp[1, 2])  # fmt: skip


def warp_labels(lab: np.ndarray, warp: np.ndarray, size: int) -> np.ndarray:
    """The instance map warped into the crop, nearest pixel; outside the slice is 0 (not annotated)."""
    n = lab.shape[0]
    rows, cols = (np.rint(c).astype(np.intp) for c in _coords(warp, size))
    inside = (rows >= 0) & (rows < n) & (cols >= 0) & (cols < n)
    out = lab[np.clip(rows, 0, n - 1), np.clip(cols, 0, n - 1)]
    out[~inside] = 0
    return out


def warp_images(img: torch.Tensor, warp: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, n, n) images warped into (B, C, size, size) crops, bilinear; outside the slice is each image's minimum."""
    n = img.shape[-1]
    r = torch.arange(size, device=img.device, dtype=torch.float32)
    w = warp.float()[..., None, None]  # (B, 2, 3, 1, 1)
    rows = w[:, 0, 0] * r[:, None] + w[:, 0, 1] * r[None] + w[:, 0, 2]
    cols = w[:, 1, 0] * r[:, None] + w[:, 1, 1] * r[None] + w[:, 1, 2]
    grid = torch.stack([(2 * cols + 1) / n - 1, (2 * rows + 1) / n - 1], -1)  # grid_sample's (x, y), pixel centres
    lo = img.amin((2, 3), keepdim=True)
    return F.grid_sample(img - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo


def resolve_images(img: torch.Tensor, amount: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, n, n) images blurred (amount < 0: sigma -amount) or sharpened (amount > 0) as `targets.resolve` does, each
    by its own amount: one separable, grouped Gaussian of `radius` px (enough for the largest sigma)."""
    b, c, h, w = img.shape
    sigma = torch.where(amount < 0, -amount, torch.full_like(amount, SHARPEN_SIGMA)).clamp_min(1e-3).float()
    x = torch.arange(-radius, radius + 1, device=img.device, dtype=torch.float32)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(img.dtype)  # (B*C, 2r+1)
    flat = img.reshape(1, b * c, h, w)
    out = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c).reshape(img.shape)
    a = amount.view(-1, 1, 1, 1).to(img.dtype)
    return torch.where(a < 0, out, img + a * (img - out))


def tone_images(img: torch.Tensor, tone: torch.Tensor, generator: torch.Generator, radius: int = 0) -> torch.Tensor:
    """Gamma inside the window, contrast about the mean, brightness, resolution (`radius` > 0) and Gaussian noise:
    `targets.augment`'s intensity changes, per image, on the device."""
    g, c, b, sigma, res = (t.view(-1, 1, 1, 1) for t in tone.float().unbind(1))
    inside = img.clamp(0, 1)  # values outside the window (air, bone) keep their offset
    img = img - inside + inside**g
    mean = img.mean((1, 2, 3), keepdim=True)
    img = (img - mean) * c + mean + b
    img = resolve_images(img, res.view(-1), radius) if radius else img
    return img + sigma * torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)


def augment_batch(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """A host-drawn batch (images whole, labels and targets already warped) finished on the device."""
    seed = int(batch.pop("noise_seed")[0])  # a CPU tensor: no device read
    res = batch["tone"][:, 4]  # still on the host: whether to resolve, and the kernel a batch needs, cost no device read
    radius = int(math.ceil(3 * max(SHARPEN_SIGMA, float(-res.min())))) if bool((res != 0).any()) else 0
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    size = batch["fg"].shape[-1]
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch["image"] = tone_images(warp_images(batch["image"], batch.pop("warp"), size), batch.pop("tone"), gen, radius)
    return batch
