"""Networks: every encoder's heads, a bad encoder name, encoder checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from comp.core.errors import UserError
from comp.nets.losses import LossConfig, instance_loss
from comp.nets.models import EMB0, ModelConfig, build_model, load_encoder
from comp.nets.targets import make_targets
from tests.conftest import TINY_NET


@pytest.mark.parametrize("encoder", ["resnet18", "tu-mobilenetv3_small_100", "tu-efficientnet_b0"])
def test_forward_backward_every_head(encoder: str) -> None:
    model = build_model(ModelConfig(encoder=encoder, **TINY_NET))
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, EMB0 + 4, 64, 64)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:30, 10:30], lab[10:30, 30:50] = 3, 7
    t = make_targets(lab)
    tgt = {k: torch.from_numpy(np.stack([getattr(t, k)] * 2)) for k in ("fg", "boundary", "touch", "dist", "instances")}
    loss, parts = instance_loss(out, tgt, LossConfig())
    assert set(parts) == {"fg", "boundary", "dist", "emb"}
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unknown_encoder_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cannot build 'no-such-encoder'"):
        build_model(ModelConfig(encoder="no-such-encoder"))


def test_encoder_checkpoint_changes_exactly_the_encoder(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder="resnet18", **TINY_NET)
    torch.manual_seed(0)
    src = build_model(cfg)
    torch.save({"encoder": src.encoder.state_dict()}, tmp_path / "enc.pt")
    torch.manual_seed(1)
    dst = build_model(cfg)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    load_encoder(dst, tmp_path / "enc.pt")
    for k, v in dst.state_dict().items():
        changed = not torch.equal(v, before[k])
        if k.startswith("net.encoder.") and v.is_floating_point() and v.numel() > 1:
            assert torch.equal(v, src.state_dict()[k])
        if not k.startswith("net.encoder."):
            assert not changed, k
    other = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET))
    torch.save({"encoder": other.encoder.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit this encoder"):
        load_encoder(dst, tmp_path / "other.pt")
    with pytest.raises(UserError, match="encoder checkpoint not found"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "none.pt"), **TINY_NET))
