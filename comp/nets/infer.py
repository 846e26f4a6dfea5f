"""Inference: slices -> float16 maps (fg, boundary, dist probabilities and embedding) at working resolution."""

from __future__ import annotations

import numpy as np
import torch

from comp.core.log import progress
from comp.core.runtime import Amp, device
from comp.nets.models import DIST, EMB0, InstanceNet
from comp.nets.targets import resize_image


def _activate(out: torch.Tensor) -> torch.Tensor:
    """Sigmoid on the probability channels, embedding left raw."""
    out = out.float()
    return torch.cat([torch.sigmoid(out[:, : DIST + 1]), out[:, EMB0:]], dim=1)


@torch.no_grad()
def predict_maps(model: InstanceNet, x: np.ndarray, res: int, batch_size: int = 16, tta: bool = False,
                 affine: tuple[float, float] = (1.0, 0.0), amp: bool = True) -> np.ndarray:  # fmt: skip
    """(N, 512, 512) uint8 slices -> (N, C, res, res) float16 maps; `tta` averages flips; `affine` as in training."""
    dev = device()
    mixed = Amp(dev, amp)  # the training's setting: bf16 where native, else fp16; nothing on the CPU
    model.to(dev).eval()
    out = None
    for i in progress(range(0, len(x), batch_size), len(x) <= batch_size, desc="predict", leave=False):
        chunk = np.stack([affine[0] * resize_image(s, res) + affine[1] for s in x[i : i + batch_size]]).astype(np.float32)
        chunk = torch.from_numpy(chunk)[:, None].to(dev)
        flips = [(), (3,), (2,)] if tta else [()]
        acc = None
        for dims in flips:
            inp = chunk.flip(dims) if dims else chunk
            with mixed.autocast():
                y = _activate(model(inp))
            y = y.flip(dims) if dims else y
            acc = y if acc is None else acc + y
        maps = (acc / len(flips)).half().cpu().numpy()  # cast on the device: half the bytes to copy, no host pass
        if out is None:
            out = np.empty((len(x),) + maps.shape[1:], np.float16)
        out[i : i + len(maps)] = maps
    return out if out is not None else np.zeros((0, EMB0, res, res), np.float16)
