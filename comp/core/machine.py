"""What a run's numbers depend on beyond code, data and seeds: the CPU, its vector kernels, threads, torch, any GPU."""

from __future__ import annotations


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def machine() -> dict:
    """The machine a run's digits came from: torch picks its CPU kernels by CPU, and a network trained on another kind of
    CPU comes out with other digits. torch is imported here, not at the top, so the non-learned path starts without it."""
    import torch

    out = {"cpu": cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}  # fmt: skip
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
