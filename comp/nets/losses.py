"""Losses of the instance heads: foreground, boundary, distance and a discriminative embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comp.core.errors import UserError
from comp.core.fields import bounded
from comp.nets.models import BOUNDARY, DIST, EMB0, FG


@dataclass
class LossConfig:
    """Weights of each head's loss (0 switches a head off) and the embedding margins."""

    fg: float = bounded(1.0, lo=0)
    boundary: float = bounded(1.0, lo=0)
    boundary_pos_weight: float = bounded(3.0, lo=0, lo_open=True)  # boundary pixels are rare; too much weight makes the map fire everywhere
    touch_weight: float = bounded(4.0, lo=0)  # extra weight on borders where two structures touch
    dist: float = bounded(0.5, lo=0)
    emb: float = bounded(0.5, lo=0)
    delta_pull: float = bounded(0.5, lo=0)
    delta_push: float = bounded(1.5, lo=0)
    dice: str = "soft"  # overlap term of the fg and boundary heads: soft (Dice) | tvmf (adaptive t-vMF Dice)
    tvmf_kappa: float = bounded(32.0, lo=0, lo_open=True)  # t-vMF: kappa = this x the batch's (detached) soft Dice, so easy heads get compact

    def __post_init__(self) -> None:
        if self.dice not in DICE_TERMS:
            raise UserError("params.train.loss.dice", f"unknown overlap term '{self.dice}' (known: {', '.join(DICE_TERMS)})")


DICE_TERMS = ("soft", "tvmf")


def _flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image probability and target vectors."""
    return torch.sigmoid(logits).flatten(1), target.flatten(1)


def _soft_dice(p: torch.Tensor, t: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """soft_dice on per-image probability vectors."""
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over each image, averaged."""
    return _soft_dice(*_flat(logits, target), eps)


def tvmf_similarity(cos: torch.Tensor, kappa: torch.Tensor | float) -> torch.Tensor:
    """t-vMF similarity (Kobayashi): (1 + cos) / (1 + kappa (1 - cos)) - 1; kappa 0 gives the cosine itself."""
    return (1 + cos) / (1 + kappa * (1 - cos)) - 1


def _tvmf_dice(p: torch.Tensor, t: torch.Tensor, kappa: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """tvmf_dice on per-image probability vectors."""
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1) + eps)
    return ((1 - tvmf_similarity(cos, kappa)) ** 2).mean()


def tvmf_dice(logits: torch.Tensor, target: torch.Tensor, kappa: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """t-vMF Dice loss (Kato & Hotta): Dice rewritten as the cosine of prediction and target, sharpened by kappa.

    Per image: (1 - phi_kappa(cos(p, t)))^2, averaged. At kappa 0 and |p| = |t| the cosine equals the Dice
    coefficient; a larger kappa keeps the loss high until the overlap is nearly perfect."""
    return _tvmf_dice(*_flat(logits, target), kappa, eps)


def overlap_loss(logits: torch.Tensor, target: torch.Tensor, cfg: "LossConfig") -> torch.Tensor:
    """The overlap term of a probability head: soft Dice, or t-vMF Dice with kappa adapted to the batch's Dice."""
    p, t = _flat(logits, target)  # once: both terms read the same probabilities
    if cfg.dice == "soft":
        return _soft_dice(p, t)
    kappa = cfg.tvmf_kappa * (1 - _soft_dice(p, t).detach())  # the batch's soft Dice coefficient, scaled
    return _tvmf_dice(p, t, kappa)


def discriminative_loss(emb: torch.Tensor, inst: torch.Tensor, d_pull: float, d_push: float, slots: int = 256) -> torch.Tensor:
    """De Brabandere et al.: pull pixels to their instance mean, push instance means apart (per image, then averaged
    over the images with an instance).

    The whole batch at once, in fixed shapes: every image has `slots` instance slots (uint8 ids), absent ones masked
    out. No step reads the device back (a per-image `any()`, boolean mask, `unique` or `bincount` each would)."""
    b, e = emb.shape[:2]
    x = emb.flatten(2).transpose(1, 2).reshape(-1, e)  # (B*HW, E)
    lab = inst.flatten(1).long()
    key = (lab + slots * torch.arange(b, device=lab.device)[:, None]).reshape(-1)  # (image, id) -> one slot index
    on = (lab > 0).reshape(-1).to(x.dtype)  # annotated pixels; id 0's slot collects nothing
    cnt = x.new_zeros(b * slots).index_add_(0, key, on)
    mu = x.new_zeros(b * slots, e).index_add_(0, key, x * on[:, None]) / cnt.clamp(min=1)[:, None]
    pull_px = F.relu((x - mu[key]).norm(dim=1) - d_pull) ** 2 * on
    pull_slot = x.new_zeros(b * slots).index_add_(0, key, pull_px) / cnt.clamp(min=1)
    present = (cnt > 0).view(b, slots)
    k = present.sum(1).clamp(min=1).to(x.dtype)
    pull = (pull_slot.view(b, slots) * present).sum(1) / k
    mu = mu.view(b, slots, e)
    # Squared distances with a tiny floor under the root: absent slots sit at distance 0, where a bare norm's
    # gradient is NaN and a mask cannot cancel it.
    n2 = (mu * mu).sum(2)
    sq = (n2[:, :, None] + n2[:, None, :] - 2 * mu @ mu.transpose(1, 2)).clamp(min=0)  # (B, slots, slots), no (.., E) copy
    pair = present[:, :, None] & present[:, None, :] & ~torch.eye(slots, dtype=torch.bool, device=x.device)
    hinge = F.relu(2 * d_push - torch.sqrt(sq + 1e-12)) ** 2 * pair
    push = hinge.sum((1, 2)) / pair.sum((1, 2)).clamp(min=1).to(x.dtype)
    reg = (mu.norm(dim=2) * present).sum(1) / k
    has = present.any(1).to(x.dtype)
    return ((pull + push + 0.001 * reg) * has).sum() / has.sum().clamp(min=1)


def instance_loss(out: torch.Tensor, tgt: dict[str, torch.Tensor], cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the heads' losses on a batch; also each part, detached on the device (read it when logging)."""
    out = out.float()
    parts: dict[str, torch.Tensor] = {}
    fg = tgt["fg"].float()  # targets travel as bytes (data.targets.Targets): converted here, on the device
    if cfg.fg > 0:
        parts["fg"] = cfg.fg * (F.binary_cross_entropy_with_logits(out[:, FG], fg) + overlap_loss(out[:, FG], fg, cfg))
    if cfg.boundary > 0:
        b = tgt["boundary"].float()
        w = 1 + (cfg.boundary_pos_weight - 1) * b + cfg.touch_weight * tgt["touch"].float()
        bce = F.binary_cross_entropy_with_logits(out[:, BOUNDARY], b, weight=w)
        parts["boundary"] = cfg.boundary * (bce + overlap_loss(out[:, BOUNDARY], b, cfg))
    if cfg.dist > 0:
        raw = F.binary_cross_entropy_with_logits(out[:, DIST], tgt["dist"], reduction="none")
        parts["dist"] = cfg.dist * (raw * fg).sum() / fg.sum().clamp(min=1)
    if cfg.emb > 0 and out.shape[1] > EMB0:
        parts["emb"] = cfg.emb * discriminative_loss(out[:, EMB0:], tgt["instances"], cfg.delta_pull, cfg.delta_push)
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}
