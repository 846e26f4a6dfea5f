"""Targets encoded (borders, bytes, augmentation on the host and on the device) and decoded (the post-processor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from comp.nets.models import ModelConfig, build_model
from comp.nets.targets import AugConfig, PostParams, augment, instances_from_maps, make_targets
from tests.conftest import TINY_NET


def test_targets_mark_touching_border() -> None:
    lab = np.zeros((20, 20), np.uint8)
    lab[4:12, 4:10], lab[4:12, 10:16] = 5, 6
    t = make_targets(lab)
    assert t.touch[:, 9:11].sum() == 16 and t.touch[:, :9].sum() == 0  # only the shared border
    assert t.boundary[4, 4:16].all() and not t.boundary[7, 6]
    assert t.dist[lab == 5].max() == pytest.approx(1.0) and t.dist[t.boundary > 0].max() == 0


def test_targets_are_bytes_and_equal_the_scipy_definition() -> None:
    """The edt-based targets equal scipy's distance transform bit for bit (phantom slices, cropped and whole), as
    uint8 masks and ids: what the loader ships."""
    from scipy import ndimage as ndi

    from comp.bench.speed import sample_slices
    from comp.nets.targets import resize_labels

    _, ys = sample_slices(4)
    for lab in [resize_labels(y, 256) for y in ys] + [ys[0][:300, 40:400]]:
        t = make_targets(np.ascontiguousarray(lab))
        assert {a.dtype for a in (t.fg, t.boundary, t.touch, t.instances)} == {np.dtype(np.uint8)} and t.dist.dtype == np.float32
        d = ndi.distance_transform_edt((t.fg > 0) & (t.boundary == 0)).astype(np.float32)
        peak = np.zeros(256, np.float32)
        np.maximum.at(peak, lab.ravel(), d.ravel())
        peak[peak == 0] = 1
        assert np.array_equal(t.dist, np.clip(d / peak[lab], 0, 1))


def test_augment_keeps_image_and_labels_aligned() -> None:
    img = np.zeros((64, 64), np.float32)
    lab = np.zeros((64, 64), np.uint8)
    img[10:20, 30:50], lab[10:20, 30:50] = 1.0, 9
    cfg = AugConfig(contrast=0, brightness=0, gamma=0, noise=0)
    for seed in range(5):
        a, b = augment(img, lab, cfg, np.random.default_rng(seed))
        assert ((a > 0.5) == (b == 9)).mean() > 0.97


def _two_squares_maps(size: int = 128) -> np.ndarray:
    """Hand-built maps: two touching squares with a boundary line between them."""
    fg = np.zeros((size, size), np.float32)
    fg[30:90, 20:100] = 1
    bnd = np.zeros_like(fg)
    bnd[30:90, 59:61] = 1
    bnd[30, 20:100] = bnd[89, 20:100] = 1
    bnd[30:90, 20] = bnd[30:90, 99] = 1
    d = ndi.distance_transform_edt((fg > 0) & (bnd == 0))
    return np.stack([fg, bnd, d / d.max(), np.zeros_like(fg), np.zeros_like(fg)])


def test_postprocessor_splits_two_touching_squares() -> None:
    lab = instances_from_maps(_two_squares_maps(), PostParams())
    assert lab.shape == (512, 512) and lab.dtype == np.uint8
    left, right = lab[240, 100:230], lab[240, 250:390]
    assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1
    assert left[0] != right[0] and left[0] > 0 and right[0] > 0
    assert len(np.unique(lab)) == 3
    # Connected components cannot separate them: that is what the boundary map is for.
    cc = instances_from_maps(_two_squares_maps(), PostParams(mode="cc"))
    assert len(np.unique(cc)) == 2


def test_maxima_seeds_split_touching_squares_whose_distance_map_sits_low() -> None:
    """A network on unfamiliar data predicts distance peaks far below seed_dist: fixed thresholds then seed nothing
    and the two squares come out as one region; the distance map's h-maxima still seed each square."""
    maps = _two_squares_maps()
    maps[2] *= 0.25  # peaks at 0.25, below seed_dist 0.3
    assert len(np.unique(instances_from_maps(maps, PostParams()))) == 2  # background + one region
    lab = instances_from_maps(maps, PostParams(seed_mode="maxima", seed_h=0.05))
    assert len(np.unique(lab)) == 3 and lab[240, 150] != lab[240, 300]


def test_postprocessor_covers_unseeded_foreground() -> None:
    maps = _two_squares_maps()
    maps[0, 100:110, 100:110] = 1  # a small blob with no seed evidence
    maps[2, 100:110, 100:110] = 0
    lab = instances_from_maps(maps, PostParams(min_size=10))
    assert (lab[410:430, 410:430] > 0).all()


def test_postprocessor_merges_by_embedding() -> None:
    maps = _two_squares_maps()
    maps = np.concatenate([maps, np.zeros((2,) + maps.shape[1:], np.float32)])
    lab = instances_from_maps(maps, PostParams(merge_embedding=0.5))  # identical embeddings: one region
    assert len(np.unique(lab)) == 2


def test_device_augmentation_keeps_image_and_labels_aligned_and_is_seeded(tmp_path: Path) -> None:
    """augment_on: device: the image warped in batch lands on its labels warped on the host (images made of the label
    ids: equal wherever a pixel's 3x3 neighbourhood has one id), crops have the crop's size, the same keys give the
    same batch, and a tiny fold trains through it."""
    from scipy import ndimage as ndi

    from comp.bench.speed import sample_slices
    from comp.nets.targets import AugConfig
    from comp.nets.warp import augment_batch
    from comp.nets.train import SliceSet, TrainConfig, train_fold

    _, ys = sample_slices(4)
    data = SliceSet(ys, ys, 128, AugConfig(contrast=0, brightness=0, gamma=0, noise=0), 0, 96, on_device=True)
    data.x = data.y.astype(np.float32)  # the image is its own label map
    batch = lambda: augment_batch(torch.utils.data.default_collate([data[k] for k in (5, 6, 7, 8)]), torch.device("cpu"))  # noqa: E731
    out = batch()
    img, lab = out["image"][:, 0].numpy(), out["instances"].numpy()
    assert img.shape == lab.shape == (4, 96, 96) and out["fg"].dtype == torch.uint8
    flat = np.stack([ndi.maximum_filter(l, 3) == ndi.minimum_filter(l, 3) for l in lab])
    assert (np.abs(img - lab)[flat] > 1e-3).mean() < 1e-3 and (lab > 0).mean() > 0.05
    assert not np.array_equal(lab, np.stack([data.y[k % 4][:96, :96] for k in (5, 6, 7, 8)]))  # it did warp
    toned = SliceSet(ys, ys, 128, AugConfig(blur=1.0, sharpen=0.5), 0, 96, on_device=True)  # resolution too
    twice = [augment_batch(torch.utils.data.default_collate([toned[k] for k in (1, 2)]), torch.device("cpu"))["image"] for _ in range(2)]
    assert torch.equal(*twice)
    cfg = TrainConfig(epochs=1, batch_size=2, resolution=64, crop=48, augment_on="device")
    info = train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET)), ys, ys, cfg, tmp_path, 0)
    assert len(info["history"]) == 1 and np.isfinite(info["history"][0]["loss"])


def test_resolution_augmentation_blurs_or_sharpens_alike_on_host_and_device_and_draws_nothing_when_off() -> None:
    from comp.nets.targets import resolution_amount, resolve
    from comp.nets.warp import resolve_images

    rng = np.random.default_rng(0)
    img = np.zeros((64, 64), np.float32)
    img[16:48, 20:44] = 1.0  # one sharp-edged square
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    state = rng.bit_generator.state
    assert resolution_amount(AugConfig(), rng) == 0.0 and rng.bit_generator.state == state  # off: the stream untouched
    amounts = [resolution_amount(AugConfig(blur=1.5, sharpen=1.0), rng) for _ in range(40)]
    assert min(amounts) >= -1.5 and max(amounts) <= 1.0 and min(amounts) < 0 < max(amounts)  # both kinds drawn
    edge = lambda x: float(np.abs(np.diff(x[32, 10:30])).max())  # noqa: E731 (the square's left edge, steepest step)
    blurred, sharpened = resolve(img, -1.5), resolve(img, 1.0)
    assert edge(blurred) < 0.6 * edge(img) and sharpened[32, 21] > 1.1 and np.array_equal(resolve(img, 0.0), img)
    both = torch.from_numpy(np.stack([img, img]))[:, None]
    dev = resolve_images(both, torch.tensor([-1.5, 1.0]), 6)[:, 0].numpy()
    assert np.abs(dev[0] - blurred).max() < 0.02 and np.abs(dev[1] - sharpened).max() < 0.05  # the same change
