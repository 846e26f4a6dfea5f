"""Model factory: segmentation-models-pytorch U-Nets (smp or timm `tu-` encoders) with instance heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from comp.core.errors import UserError
from comp.core.fields import bounded

# Output channels, in order: foreground logit, boundary logit, distance/centre logit, then embedding.
FG, BOUNDARY, DIST, EMB0 = 0, 1, 2, 3


@dataclass
class ModelConfig:
    """Which network to build; any smp encoder name works, including timm's as 'tu-<name>'."""

    arch: str = "Unet"  # any smp architecture class with encoder_name/in_channels/classes
    encoder: str = "resnet18"
    encoder_weights: str = "none"  # none | imagenet (downloads: only when asked and online) | a checkpoint path
    embedding_dim: int = bounded(8, lo=0)
    decoder_channels: list[int] = bounded(factory=lambda: [256, 128, 64, 32, 16], lo=1, min_len=1)


class WindowStem(nn.Module):
    """Intensity windows as input channels: each (low, high) maps the input to clamp((x - low) / (high - low), 0, 1)."""

    def __init__(self, windows: tuple[tuple[float, float], ...]) -> None:
        super().__init__()
        self.register_buffer("windows", torch.tensor(windows, dtype=torch.float32).reshape(-1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, C, H, W), one channel per window."""
        lo, hi = self.windows[:, 0].view(1, -1, 1, 1), self.windows[:, 1].view(1, -1, 1, 1)
        return ((x - lo) / (hi - lo)).clamp(0, 1)


class InstanceNet(nn.Module):
    """A segmentation network behind a window stem (one input slice, one channel per window), its outputs named maps."""

    def __init__(self, net: nn.Module, embedding_dim: int, windows: tuple[tuple[float, float], ...] = ((0.0, 1.0),)) -> None:
        super().__init__()
        self.stem = WindowStem(windows)
        self.net = net
        self.embedding_dim = embedding_dim

    @property
    def encoder(self) -> nn.Module:
        """The backbone (what self-supervised pretraining initialises)."""
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W), 0..1 over the main window -> (B, 3 + embedding_dim, H, W) raw outputs."""
        return self.net(self.stem(x))


def _smp_net(cfg: ModelConfig, weights: str | None, in_channels: int = 1) -> nn.Module:
    """Instantiate the smp architecture, with a clear error for unknown names."""
    import segmentation_models_pytorch as smp

    arch = getattr(smp, cfg.arch, None)
    if arch is None or not isinstance(arch, type):
        raise UserError("model.arch", f"unknown smp architecture '{cfg.arch}'")
    kwargs = dict(encoder_name=cfg.encoder, encoder_weights=weights, in_channels=in_channels, classes=EMB0 + cfg.embedding_dim)
    if cfg.arch in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    try:
        return arch(**kwargs)
    except (KeyError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError("model.encoder", f"cannot build '{cfg.encoder}' ({msg[:200]})") from None


def build_model(cfg: ModelConfig, windows: tuple[tuple[float, float], ...] = ((0.0, 1.0),)) -> InstanceNet:
    """Build the network (one input channel per contrast window); encoder weights are random unless the config names a source."""
    src = cfg.encoder_weights
    if src == "imagenet":
        try:
            net = _smp_net(cfg, "imagenet", len(windows))
        except OSError as exc:  # offline, or the hub refused
            raise UserError("model.encoder_weights", f"could not download imagenet weights ({exc}); use 'none' offline") from None
    else:
        net = _smp_net(cfg, None, len(windows))
    model = InstanceNet(net, cfg.embedding_dim, windows)
    if src not in ("none", "", None, "imagenet"):
        load_encoder(model, Path(src))
    return model


def load_encoder(model: InstanceNet, path: Path) -> None:
    """Load an encoder checkpoint (e.g. from `comp pretrain`); every key must fit the encoder."""
    if not path.is_file():
        raise UserError(path, "encoder checkpoint not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(path, f"not a readable checkpoint ({exc.__class__.__name__})") from None
    state = blob.get("encoder", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise UserError(path, "checkpoint holds no encoder state dict")
    own = model.encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        what = (
            f"{len(missing)} missing keys (e.g. '{missing[0]}')" if missing
            else f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')" if unexpected
            else f"shape mismatch at '{shapes[0]}' ({tuple(state[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)})"
        )
        raise UserError(path, f"encoder checkpoint does not fit this encoder: {what}")
    model.encoder.load_state_dict(state)

