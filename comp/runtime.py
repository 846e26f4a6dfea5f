"""Where and how tensors run: the device, mixed precision and seeding, shared by training, inference and pretraining."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from comp.errors import UserError


DEVICE_ENV = "COMP_DEVICE"  # auto | cuda | cpu; `python -m comp --device …` sets it
DRIVER_FOR_CUDA = {"13": 580, "12": 525}  # NVIDIA's minimum Linux driver per CUDA major version (its compatibility table)


def device() -> torch.device:
    """CUDA when present, else the CPU: but a GPU was asked for (--device cuda, or CUDA_VISIBLE_DEVICES naming one) and
    none is usable, the run stops with one line instead of training on the CPU for days (--device cpu to mean it)."""
    want = os.environ.get(DEVICE_ENV, "auto")
    if want not in ("auto", "cuda", "cpu"):
        raise UserError(DEVICE_ENV, f"must be auto, cuda or cpu, got {want!r}")
    if want == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if want == "cuda" or (visible is not None and visible.strip() not in ("", "-1")):
        build = torch.version.cuda
        need = DRIVER_FOR_CUDA.get(str(build).split(".")[0]) if build else None
        why = (f"this torch {torch.__version__} is built for CUDA {build}, which needs an NVIDIA driver {need} or newer (`nvidia-smi` "
               "shows the driver)" if need else f"this torch {torch.__version__} is built without CUDA ({build})")  # fmt: skip
        asked = "--device cuda" if want == "cuda" else f"CUDA_VISIBLE_DEVICES={visible}"
        raise UserError("device", f"{asked} asks for a GPU but torch finds none usable: {why}; `--device cpu` runs on the CPU")
    return torch.device("cpu")


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
