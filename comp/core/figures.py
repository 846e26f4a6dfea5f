"""Figures (headless matplotlib): curves, overlays, histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comp.core.atomic import atomic_path


def pyplot():
    """matplotlib with a file-only backend (no screen on a GPU box either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    pyplot().close(fig)


def plot_curves(series: dict[str, tuple[list, list]], path: Path, title: str, ylabel: str) -> None:
    """Line plot of named (x, y) series as a PNG."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """Instance ids -> colours (0 black), the same id always the same colour."""
    rng = np.random.default_rng(7)
    lut = np.concatenate([[[0, 0, 0]], rng.integers(60, 256, (255, 3))]).astype(np.uint8)
    return lut[labels]


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """Four panels: slice, truth, prediction, slice with truth (green) and predicted (red) region borders."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(image[..., None], 3, axis=2)
    rgb[find_boundaries(truth, mode="inner") & (truth > 0)] = (0, 220, 0)
    rgb[find_boundaries(pred, mode="inner") & (pred > 0)] = (255, 40, 40)
    fig, axes = pyplot().subplots(1, 4, figsize=(12, 3.2))
    for ax, img, name in zip(axes, (image, _label_rgb(truth), _label_rgb(pred), rgb), ("slice", "truth", "prediction", "borders: truth green, prediction red")):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def histogram_png(scores: np.ndarray, path: Path, title: str) -> None:
    """Histogram of per-image OOF ARI."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.2))
    ax.hist(scores, bins=np.linspace(min(0.0, float(scores.min())), 1, 26), color="#4477aa")
    ax.axvline(float(scores.mean()), color="k", ls="--", label=f"mean {scores.mean():.4f}")
    ax.set_xlabel("per-image ARI")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
