"""Learned instance maps: heads, losses, targets, post-processor, training, resume after kill -9."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from comp.core.errors import UserError
from comp.nets.losses import LossConfig, discriminative_loss, instance_loss
from comp.nets.models import EMB0, ModelConfig, build_model, load_encoder
from comp.nets.targets import AugConfig, augment, make_targets
from comp.nets.targets import PostParams, instances_from_maps
from comp.pipeline.workspace import RunDir
from tests.conftest import ROOT

TINY = dict(decoder_channels=[16, 8, 8, 8, 8], embedding_dim=4)


@pytest.mark.parametrize("encoder", ["resnet18", "tu-mobilenetv3_small_100", "tu-efficientnet_b0"])
def test_forward_backward_every_head(encoder: str) -> None:
    model = build_model(ModelConfig(encoder=encoder, **TINY))
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

    model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY))
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


def test_encoder_checkpoint_changes_exactly_the_encoder(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder="resnet18", **TINY)
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
    other = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY))
    torch.save({"encoder": other.encoder.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit this encoder"):
        load_encoder(dst, tmp_path / "other.pt")
    with pytest.raises(UserError, match="encoder checkpoint not found"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "none.pt"), **TINY))


TINY_EXP = """
method: unet
params:
  model: {{encoder: tu-mobilenetv3_small_100, decoder_channels: [16, 8, 8, 8, 8], embedding_dim: 4}}
  train: {{epochs: {epochs}, batch_size: 4, resolution: 64, lr: 0.003}}
  post: {{min_size: 10}}
  workers: 1
cv: {{folds: 2}}
"""


def _cv(exp: Path, data: Path, runs: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "comp", "cv", str(exp), "--data", str(data), "--runs", str(runs)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_tiny_training_end_to_end_caches_maps(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXP.format(epochs=2))
    p = _cv(exp, tiny_phantom, tmp_path / "runs")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    run = next((tmp_path / "runs" / "tiny").iterdir())
    cv = json.loads((run / "cv.json").read_text())
    assert cv["n_images"] == 8
    for k in (0, 1):
        maps = RunDir(run).oof_maps(k)
        assert maps.values.dtype == np.uint8 and maps.shape == (4, EMB0 + 4, 64, 64)  # cached quantised
        assert len(RunDir(run).test_maps(k)) == 4
        assert (run / f"fold{k}" / "best.pt").is_file() and (run / f"fold{k}" / "last.pt").is_file()
        assert len(json.loads((run / f"fold{k}" / "history.json").read_text())) == 2


@pytest.mark.slow
def test_kill_9_mid_training_resumes_from_checkpoint(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "resume.yaml"
    exp.write_text(TINY_EXP.format(epochs=30))
    runs = tmp_path / "runs"
    p = _cv(exp, tiny_phantom, runs, start_new_session=True)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        found = list(runs.glob("resume/*/fold0/last.pt"))
        if found:
            last = found[0]
            time.sleep(0.5)  # let it get into a later epoch
            break
        time.sleep(0.2)
    assert last is not None, "no checkpoint appeared"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = torch.load(last, weights_only=False)["epoch"]
    assert done < 29, "training finished before the kill; the test needs a slower run"
    p2 = _cv(exp, tiny_phantom, runs)  # the same command again
    out, _ = p2.communicate(timeout=600)
    assert p2.returncode == 0, out
    assert f"resuming from {last} at epoch {done + 1}" in out
    hist = json.loads((last.parent / "history.json").read_text())
    assert [h["epoch"] for h in hist] == list(range(30))  # no epoch lost or repeated


@pytest.mark.slow
def test_selection_never_sees_the_scored_fold_and_seeds_fix_the_weights(tmp_path, tiny_phantom):
    """The epoch is picked on an inner split of the training images; two runs in one process score the same."""
    import json

    import pandas as pd
    import yaml

    from comp.pipeline.config import experiment_from_dict
    from comp.pipeline.cv import run_cv
    from comp.data.dataset import Dataset
    from tests.conftest import TINY_UNET

    raw = yaml.safe_load(TINY_UNET)
    raw["params"]["val_images"] = 2
    exp = experiment_from_dict({**raw, "name": "tinysel"}, tmp_path / "tinysel.yaml")
    data = Dataset(tiny_phantom)
    scores = []
    for k in range(2):  # the second run's build follows a whole training in this process
        run = run_cv(exp, data, runs=tmp_path / f"runs{k}").run_dir
        folds = pd.read_csv(run / "folds.csv")
        for f in range(2):
            val_ids = json.loads((run / f"fold{f}" / "fold.json").read_text())["fitted"]["val_ids"]
            scored = set(folds.loc[folds["fold"] == f, "index"])
            trained = set(folds.loc[folds["fold"] != f, "index"])
            assert len(val_ids) == 2 and set(val_ids) <= trained and not set(val_ids) & scored
        scores.append(pd.read_csv(run / "oof_scores.csv")["ari"].to_numpy())
    assert np.array_equal(scores[0], scores[1])


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


@pytest.mark.slow
def test_two_processes_share_one_run_each_fold_once_same_score(tiny_phantom: Path, tmp_path: Path) -> None:
    """`make cv GPUS="0 1"` in miniature: two processes on one run folder split its folds and match a one-process run."""
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXP.format(epochs=2).replace("folds: 2", "folds: 3"))
    procs = [_cv(exp, tiny_phantom, tmp_path / "runs") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(outs)
    for f in range(3):
        assert text.count(f"fold {f}: ARI") == 1, text  # trained exactly once, by one of the two
    run = RunDir(next((tmp_path / "runs" / "tiny").iterdir()))
    assert run.finished and len(list((tmp_path / "runs" / "tiny").iterdir())) == 1
    one = _cv(exp, tiny_phantom, tmp_path / "one")
    assert one.wait(timeout=600) == 0
    alone = RunDir(next((tmp_path / "one" / "tiny").iterdir())).summary()
    assert abs(alone["mean_ari"] - run.summary()["mean_ari"]) < 1e-9


def test_a_training_epoch_reads_the_loss_back_only_when_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each float(tensor) waits for the device: a step must not do one (the progress bar does, every LOG_EVERY steps)."""
    from comp.core.runtime import Amp
    from comp.nets.train import LOG_EVERY, run_epoch

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.01)
    batches = [torch.randn(4, 3) for _ in range(60)]

    def loss_fn(b: torch.Tensor):
        loss = ((b * w).sum(1) ** 2).mean()
        return loss, {"a": loss.detach(), "b": 2 * loss.detach()}

    reads = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real(t))
    parts = run_epoch(batches, opt, Amp(torch.device("cpu"), False), loss_fn, lambda s: 0.01, 0, "t")
    assert len(reads) <= 60 // LOG_EVERY + 2  # the bar's few, then one per part at the end
    assert parts["b"] == pytest.approx(2 * parts["a"], rel=1e-6)


def test_amp_uses_bf16_only_where_the_card_has_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """A card that only emulates bf16 gets fp16 + loss scaling (the default is_bf16_supported() counts emulation)."""
    from comp.core.runtime import Amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # emulation only
    assert Amp(torch.device("cuda"), True).dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # native
    assert Amp(torch.device("cuda"), True).dtype == torch.bfloat16
    assert not Amp(torch.device("cuda"), False).enabled and not Amp(torch.device("cpu"), True).enabled


def test_resume_loads_the_checkpoint_onto_the_cpu_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RNG states must stay CPU tensors on a GPU box (set_rng_state raises otherwise), and no pickle runs."""
    from comp.nets.train import TrainConfig, train_fold

    xs = np.random.default_rng(0).integers(0, 255, (4, 512, 512)).astype(np.uint8)
    ys = np.zeros((4, 512, 512), np.uint8)
    ys[:, 100:200, 100:200] = 1
    cfg = ModelConfig(encoder="tu-mobilenetv3_small_100", decoder_channels=(16, 8, 8, 8, 8), embedding_dim=4)
    train = TrainConfig(epochs=1, batch_size=2, resolution=32)
    train_fold(build_model(cfg), xs, ys, train, tmp_path, 0)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    train_fold(build_model(cfg), xs, ys, train, tmp_path, 0)  # finished: resumes past the last epoch
    assert calls and all(k.get("map_location") == "cpu" and k.get("weights_only") is True for k in calls)


def test_a_killed_runs_checkpoint_temps_are_cleared_on_resume(tmp_path: Path) -> None:
    """kill -9 during torch.save leaves fold0/.last.pt.<random>.pt (atomic_path's cleanup never ran): the next start clears it."""
    from comp.nets.train import TrainConfig, train_fold

    xs = np.random.default_rng(0).integers(0, 255, (2, 512, 512)).astype(np.uint8)
    ys = np.zeros((2, 512, 512), np.uint8)
    ys[:, 100:200, 100:200] = 1
    left = [tmp_path / ".last.pt.k9x2a.pt", tmp_path / ".best.pt.q1w2e.pt"]
    for p in left:
        p.write_bytes(b"half a checkpoint")
    cfg = ModelConfig(encoder="tu-mobilenetv3_small_100", decoder_channels=(16, 8, 8, 8, 8), embedding_dim=4)
    train_fold(build_model(cfg), xs, ys, TrainConfig(epochs=1, batch_size=2, resolution=32), tmp_path, 0)
    assert not any(p.exists() for p in left) and (tmp_path / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_scaler_state_resumes_across_amp_kinds() -> None:
    """An empty state (a CPU or bf16 checkpoint) resumes on a loss-scaling run without the crash GradScaler raises;
    a real state is taken; a disabled scaler ignores one."""
    import torch

    from comp.core.runtime import Amp

    amp = Amp(torch.device("cpu"), False)
    amp.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)  # stands in for a CUDA fp16 scaler
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict({})  # what resuming used to call
    amp.load_scaler({})
    assert amp.scaler.get_scale() == 128.0
    amp.load_scaler(torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0).state_dict())
    assert amp.scaler.get_scale() == 1024.0
    Amp(torch.device("cpu"), True).load_scaler({"scale": 2.0})  # CPU: no scaling, the state is ignored


@pytest.mark.slow
def test_a_gpu_asked_for_and_missing_stops_the_run_with_one_line(tiny_phantom, tmp_path) -> None:
    """CUDA_VISIBLE_DEVICES naming a card torch cannot use: exit 2, one line naming the CUDA build and the driver it
    needs, no fold trained; `--device cpu` runs on the CPU as asked."""
    import torch

    from conftest import TINY_UNET, run_cli

    exp = tmp_path / "tinydev.yaml"
    exp.write_text("name: tinydev\n" + TINY_UNET)
    args = ["cv", str(exp), "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs")]
    hide = {"CUDA_VISIBLE_DEVICES": "7"} if not torch.cuda.is_available() else {"CUDA_VISIBLE_DEVICES": "7", "COMP_DEVICE": "cuda"}
    r = run_cli(*args, env=hide)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "CUDA_VISIBLE_DEVICES=7" in r.stderr and f"CUDA {torch.version.cuda}" in r.stderr and "--device cpu" in r.stderr
    assert not (tmp_path / "runs" / "tinydev").exists()  # stopped before any run folder


def test_device_cpu_is_taken_even_with_a_gpu_named(monkeypatch) -> None:
    """`python -m comp --device cpu …` (COMP_DEVICE) means the CPU whatever CUDA_VISIBLE_DEVICES says."""
    import torch

    from comp.cli import main
    from comp.core.runtime import device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.setenv("COMP_DEVICE", "auto")  # recorded, so the value main() sets below is undone after the test
    monkeypatch.delenv("COMP_DEVICE")
    assert main(["--device", "cpu", "score", "no.csv", "no.csv"]) == 2  # the flag is read before the command runs
    import os

    assert os.environ["COMP_DEVICE"] == "cpu" and device() == torch.device("cpu")
    monkeypatch.setenv("COMP_DEVICE", "gpu")
    with pytest.raises(Exception, match="auto, cuda or cpu"):
        device()


@pytest.mark.slow
def test_a_gpu_sized_config_refuses_the_cpu_unless_told(tiny_phantom, tmp_path, monkeypatch) -> None:
    """`device: cuda` in a config (every GPU-sized one has it) and no usable GPU: one line, exit 2, nothing written;
    `--device cpu` runs it on the CPU; the setting is not part of the run's identity."""
    import torch

    from comp.pipeline.config import EXPERIMENTS, load_experiment
    from conftest import TINY_UNET, run_cli

    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the subprocesses below still see the card
    for name in ("unet_resnet34", "unet_effb0", "unet_mnv3", "unet_fg_cc"):
        assert load_experiment(name).params.train.device == "cuda", name
    exp = tmp_path / "tinygpu.yaml"
    exp.write_text("name: tinygpu\n" + TINY_UNET.replace("lr: 0.003}", "lr: 0.003, device: cuda}"))
    args = ["cv", str(exp), "--data", str(tiny_phantom), "--runs", str(tmp_path / "runs")]
    env = {"CUDA_VISIBLE_DEVICES": ""}  # no card for torch, and none named
    r = run_cli(*args, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sized for a GPU" in r.stderr and "--device cpu" in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "tinygpu").exists()
    r = run_cli("--device", "cpu", *args, env=env)
    assert r.returncode == 0 and "training on cpu" in r.stdout, r.stderr[-2000:]
    plain = load_experiment(str(EXPERIMENTS / "unet_cpu.yaml"))
    gpu = dataclasses.replace(plain, params=dataclasses.replace(plain.params, train=dataclasses.replace(plain.params.train, device="cuda")))
    assert gpu.digest() == plain.digest()


def test_checkpoints_at_the_configured_cadence_and_always_at_the_end(tmp_path: Path, monkeypatch) -> None:
    """checkpoint_every=2 over 5 epochs: last.pt after epochs 2, 4 and 5; best.pt with them, never per improvement;
    the cadence is not part of the run's identity, so a run resumes under another cadence."""
    import comp.nets.train as train
    from comp.pipeline.config import load_experiment

    saved = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: saved.append((path.name, state["epoch"] + 1)) or real(path, state))
    lab = np.zeros((4, 64, 64), np.uint8)
    lab[:, 10:30, 10:40] = 5
    x = (np.random.default_rng(0).random((4, 64, 64)) * 255).astype(np.uint8)
    cfg = train.TrainConfig(epochs=5, batch_size=2, resolution=32, checkpoint_every=2, aug=None)
    scores = iter([0.1, 0.3, 0.2, 0.4, 0.5])
    train.train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY)), x, lab, cfg, tmp_path, 0,
                     validate=lambda m: next(scores))  # fmt: skip
    assert saved == [("best.pt", 2), ("last.pt", 2), ("best.pt", 4), ("last.pt", 4), ("best.pt", 5), ("last.pt", 5)]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["val_ari"] == 0.5
    saved.clear()
    more = dataclasses.replace(cfg, epochs=5, checkpoint_every=3)
    train.train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY)), x, lab, more, tmp_path, 0)
    assert saved == []  # finished at epoch 5 under either cadence: resumed, nothing to train
    a = load_experiment("unet_cpu")
    b = dataclasses.replace(a, params=dataclasses.replace(a.params, train=dataclasses.replace(a.params.train, checkpoint_every=7)))
    assert a.digest() == b.digest()


@pytest.mark.slow
def test_a_loader_with_workers_gives_the_same_training_as_without(tmp_path: Path) -> None:
    """Worker processes (the GPU configs' path, never run by a test before) build the same seeded batches: the same
    weights after two epochs as in-process loading; batches carry the masks and ids as bytes."""
    from comp.nets.train import SliceSet, TrainConfig, loader_workers, make_loader, train_fold

    lab = np.zeros((6, 64, 64), np.uint8)
    lab[:, 10:30, 10:40], lab[:, 35:60, 5:50] = 5, 9
    x = (np.random.default_rng(0).random((6, 64, 64)) * 255).astype(np.uint8)
    cfg = TrainConfig(epochs=2, batch_size=2, resolution=32)
    assert loader_workers(2) >= 1  # at least one real worker process, even on 2 cores
    loader, _ = make_loader(SliceSet(x, lab, 32, cfg.aug, 0), dataclasses.replace(cfg, num_workers=2), torch.Generator(), False)
    batch = next(iter(loader))
    assert loader.num_workers >= 1 and {batch[k].dtype for k in ("fg", "boundary", "touch", "instances")} == {torch.uint8}
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY))
        train_fold(model, x, lab, dataclasses.replace(cfg, num_workers=workers), tmp_path / str(workers), 0)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_post_processing_workers_get_only_the_channels_they_read(monkeypatch, tmp_path: Path) -> None:
    """Cached 12-channel maps, no embedding merge: the workers are sent 3 channels, lazily; with the merge, all 12."""
    import comp.methods.unet as learned
    from comp.nets.targets import PostParams
    from comp.core.store import load_maps, save_maps

    save_maps(tmp_path / "m.npy", np.random.default_rng(0).random((3, 12, 16, 16)).astype(np.float32))
    sent = []
    monkeypatch.setattr(learned, "pmap", lambda fn, items, *a, **k: [sent.append(items[i].shape) or np.zeros((512, 512), np.uint8) for i in range(len(items))])
    method = learned.LearnedInstances(learned.LearnedParams(post=PostParams()))
    method.postprocess_maps(load_maps(tmp_path / "m.npy"))
    method.p.post.merge_embedding = 0.5
    method.postprocess_maps(load_maps(tmp_path / "m.npy"))
    assert sent == [(3, 16, 16)] * 3 + [(12, 16, 16)] * 3


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
    toned = SliceSet(ys, ys, 128, AugConfig(), 0, 96, on_device=True)
    twice = [augment_batch(torch.utils.data.default_collate([toned[k] for k in (1, 2)]), torch.device("cpu"))["image"] for _ in range(2)]
    assert torch.equal(*twice)
    cfg = TrainConfig(epochs=1, batch_size=2, resolution=64, crop=48, augment_on="device")
    info = train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY)), ys, ys, cfg, tmp_path, 0)
    assert len(info["history"]) == 1 and np.isfinite(info["history"][0]["loss"])


@pytest.mark.slow
def test_one_loader_stream_spans_the_epochs_and_a_killed_fold_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    """The fold's batches come from one iterator (workers prefetch into the next epoch); a run stopped after epoch 2
    of 4 and started again ends with the weights of an uninterrupted run: the checkpoint keeps the shuffle's state
    before the next epoch, not the state the prefetching has reached."""
    import comp.nets.train as train

    lab = np.zeros((5, 64, 64), np.uint8)
    lab[:, 10:30, 10:40], lab[:, 35:60, 5:50] = 5, 9
    x = (np.random.default_rng(0).random((5, 64, 64)) * 255).astype(np.uint8)
    cfg = train.TrainConfig(epochs=4, batch_size=2, resolution=32, num_workers=2, checkpoint_every=2)
    batches = train.EpochBatches(5, 2, True, torch.Generator().manual_seed(0), epochs=3)
    keys = list(batches)
    assert len(keys) == len(batches) == 6 and all(len({k // 5 for k in b}) == 1 for b in keys)  # no batch spans epochs

    def fold(workdir: Path) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY))
        train.train_fold(model, x, lab, cfg, workdir, 0)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    whole = fold(tmp_path / "whole")
    real, calls = train.run_epoch, []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(train, "run_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        fold(tmp_path / "killed")
    monkeypatch.setattr(train, "run_epoch", real)
    assert torch.equal(fold(tmp_path / "killed"), whole)
