"""Where and how tensors run: the device, mixed precision and seeding, shared by training, inference and pretraining."""

from __future__ import annotations

import random

import numpy as np
import torch


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
