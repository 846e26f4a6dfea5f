"""Where and how tensors run: the device, mixed precision and seeding, shared by training, inference and pretraining."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from comp.core.errors import UserError


DEVICE_ENV = "COMP_DEVICE"  # auto | cuda | cpu; `python -m comp --device …` sets it
DRIVER_FOR_CUDA = {"13": 580, "12": 525}  # NVIDIA's minimum Linux driver per CUDA major version (its compatibility table)


DEVICE_SETTINGS = ("auto", "cuda")  # a config's `device`: cuda = sized for a GPU, refuses the CPU unless --device cpu


def device(config: str = "auto") -> torch.device:
    """CUDA when present, else the CPU: but where a GPU was asked for (--device cuda, CUDA_VISIBLE_DEVICES naming one, or
    a GPU-sized config's `device: cuda`) and none is usable, the run stops with one line instead of training on the
    CPU for days (`--device cpu` to mean it)."""
    want = os.environ.get(DEVICE_ENV, "auto")
    if want not in ("auto", "cuda", "cpu"):
        raise UserError(DEVICE_ENV, f"must be auto, cuda or cpu, got {want!r}")
    if config not in DEVICE_SETTINGS:
        raise UserError("device", f"a config's device must be {' or '.join(DEVICE_SETTINGS)}, got {config!r}")
    if want == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    named = visible is not None and visible.strip() not in ("", "-1")
    if want == "cuda" or named or config == "cuda":
        asked = ("--device cuda" if want == "cuda" else f"CUDA_VISIBLE_DEVICES={visible}" if named
                 else "this config is sized for a GPU (its device: cuda)")  # fmt: skip
        raise UserError("device", f"{asked} asks for a GPU but torch finds none usable: {_why_no_cuda()}; `--device cpu` runs on the CPU")
    return torch.device("cpu")


def _why_no_cuda() -> str:
    """Why torch sees no GPU, in words: the CUDA build and the NVIDIA driver it needs."""
    build = torch.version.cuda
    need = DRIVER_FOR_CUDA.get(str(build).split(".")[0]) if build else None
    if need:
        return f"this torch {torch.__version__} is built for CUDA {build}, which needs an NVIDIA driver {need} or newer (`nvidia-smi` shows the driver)"
    return f"this torch {torch.__version__} is built without CUDA ({build})"


def describe(dev: torch.device) -> str:
    """The device in words, for the first line of a run (a 512 px config silently on the CPU is hours lost)."""
    return f"{dev.type} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


class Amp:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); a no-op on CPU."""

    def __init__(self, dev: torch.device, enabled: bool) -> None:
        self.dev, self.enabled = dev, enabled and dev.type == "cuda"
        native_bf16 = self.enabled and torch.cuda.is_bf16_supported(including_emulation=False)
        self.dtype = torch.bfloat16 if native_bf16 else torch.float16  # emulated bf16 is slow: fp16 + loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def load_scaler(self, state: dict | None) -> None:
        """Resume a checkpoint's loss-scaler state. A state saved without fp16 loss scaling (a CPU or bf16 run: empty)
        leaves this scaler fresh, and a state is ignored where this run scales nothing: checkpoints resume across
        AMP kinds instead of crashing in GradScaler.load_state_dict."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context."""
        return torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.enabled)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
