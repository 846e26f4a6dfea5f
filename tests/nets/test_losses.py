"""Losses: the discriminative embedding loss (batched, no host reads), the tvMF Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comp.core.errors import UserError
from comp.nets.losses import discriminative_loss
from comp.nets.models import ModelConfig, build_model
from comp.nets.targets import make_targets
from tests.conftest import TINY_NET


def test_discriminative_loss_zero_on_perfect_embeddings_larger_when_shuffled() -> None:
    lab = torch.zeros(1, 32, 32, dtype=torch.long)
    lab[0, 2:14, 2:14], lab[0, 2:14, 16:30], lab[0, 18:30, 2:30] = 1, 2, 3
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    emb = centres[lab[0]].permute(2, 0, 1)[None]  # every pixel exactly at its instance's centre
    perfect = discriminative_loss(emb, lab, 0.5, 1.5)
    assert float(perfect) < 0.02  # only the tiny regulariser remains
    g = torch.Generator().manual_seed(0)
    shuffled = emb.flatten(2)[..., torch.randperm(32 * 32, generator=g)].reshape(emb.shape)
    assert float(discriminative_loss(shuffled, lab, 0.5, 1.5)) > 10 * float(perfect) + 0.5


def _per_image_discriminative(emb: torch.Tensor, inst: torch.Tensor, d_pull: float, d_push: float) -> torch.Tensor:
    """The loss as first written, one image and its present ids at a time: the definition the batched one must keep."""
    import torch.nn.functional as F

    total, count = emb.new_zeros(()), 0
    for e, lab in zip(emb, inst):
        m = lab > 0
        if not m.any():
            continue
        x = e[:, m].T
        _, inv = torch.unique(lab[m], return_inverse=True)
        k = int(inv.max()) + 1
        cnt = torch.bincount(inv, minlength=k).to(x.dtype)
        mu = torch.zeros(k, x.shape[1]).index_add_(0, inv, x) / cnt[:, None]
        pull = (torch.zeros(k).index_add_(0, inv, F.relu((x - mu[inv]).norm(dim=1) - d_pull) ** 2) / cnt).mean()
        d = torch.cdist(mu[None], mu[None])[0][~torch.eye(k, dtype=torch.bool)]
        push = (F.relu(2 * d_push - d) ** 2).mean() if k > 1 else 0.0
        total, count = total + pull + push + 0.001 * mu.norm(dim=1).mean(), count + 1
    return total / max(count, 1)


def test_batched_discriminative_loss_equals_the_per_image_definition() -> None:
    """Same value and gradient as the per-image loss, with an image without instances and one with a single one."""
    g = torch.Generator().manual_seed(0)
    inst = torch.randint(0, 6, (4, 48, 48), generator=g) * torch.tensor([1, 13, 1, 1])[:, None, None] % 256
    inst[2], inst[3] = 0, (inst[3] > 0) * 7
    emb = torch.randn(4, 6, 48, 48, generator=g)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    la, lb = discriminative_loss(a, inst, 0.5, 1.5), _per_image_discriminative(b, inst, 0.5, 1.5)
    (la + lb).backward()
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-5)
    assert torch.isfinite(a.grad).all() and torch.allclose(a.grad, b.grad, atol=1e-7)


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make the host wait for the device: a scalar read, or an output sized by the data."""

    SYNCING = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "bincount", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))
        if name in self.SYNCING or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_a_training_step_with_the_embedding_head_reads_nothing_back() -> None:
    """Forward, every head's loss and backward on a batch: no op that waits for the device (on CUDA each would stall
    the step; the per-image embedding loss made ~4 per image)."""
    from comp.core.runtime import Amp
    from comp.nets.train import TrainConfig, step_loss

    model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET))
    lab = np.zeros((3, 64, 64), np.uint8)
    lab[0, 10:30, 10:30], lab[0, 10:30, 30:50], lab[2, 5:20, 5:60] = 3, 7, 9  # image 1 has no instance
    ts = [make_targets(l) for l in lab]
    batch = {k: torch.from_numpy(np.stack([getattr(t, k) for t in ts])) for k in ("fg", "boundary", "touch", "dist", "instances")}
    batch["image"] = torch.rand(3, 1, 64, 64)
    loss_of = step_loss(model, TrainConfig(), Amp(torch.device("cpu"), False), torch.device("cpu"))
    with HostReads() as reads:
        loss, parts = loss_of(batch)
        loss.backward()
    assert "emb" in parts and reads.ops == []
    with HostReads() as reads:  # the detector itself: the per-image definition is caught
        _per_image_discriminative(torch.randn(3, 4, 64, 64), batch["instances"], 0.5, 1.5)
    assert {"_local_scalar_dense", "_unique2", "bincount"} <= set(reads.ops)


def test_tvmf_dice_is_the_cosine_dice_at_kappa_zero_and_sharper_above() -> None:
    from comp.nets.losses import soft_dice, tvmf_dice

    torch.manual_seed(0)
    target = (torch.rand(2, 16, 16) > 0.6).float()
    logits = torch.randn(2, 16, 16)
    p = torch.sigmoid(logits).flatten(1)
    cos = (p * target.flatten(1)).sum(1) / (p.norm(dim=1) * target.flatten(1).norm(dim=1))
    assert torch.allclose(tvmf_dice(logits, target, 0.0), ((1 - cos) ** 2).mean(), atol=1e-5)
    # Where |p| = |t| (a perfect or a rescaled-to-equal-norm prediction) the cosine is the Dice coefficient.
    perfect = torch.where(target > 0, 30.0, -30.0)
    assert tvmf_dice(perfect, target, 0.0) < 1e-6 and soft_dice(perfect, target, eps=0.0) < 1e-6
    half = torch.where(target > 0, 0.0, -30.0)  # p = 0.5 on every true pixel: cos = 1, Dice = 2/3
    assert tvmf_dice(half, target, 0.0) < 1e-6 and tvmf_dice(half, target, 32.0) < 1e-6
    assert tvmf_dice(logits, target, 32.0) > tvmf_dice(logits, target, 0.0)  # a larger kappa: a stricter loss


def test_tvmf_loss_decreases_on_a_tiny_fit() -> None:
    from comp.nets.losses import LossConfig, overlap_loss

    torch.manual_seed(0)
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    logits = torch.zeros(2, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    cfg = LossConfig(dice="tvmf")
    first = float(overlap_loss(logits, target, cfg).detach())
    for _ in range(50):
        opt.zero_grad()
        loss = overlap_loss(logits, target, cfg)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first
    with pytest.raises(UserError, match="unknown overlap term"):
        LossConfig(dice="focal")
