"""Training: resume after kill -9, selection, AMP, checkpoints, loader streams, the device a run asks for."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from comp.nets.models import ModelConfig, build_model
from tests.conftest import TINY_EXP, TINY_NET, cv_process


@pytest.mark.slow
def test_kill_9_mid_training_resumes_from_checkpoint(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "resume.yaml"
    exp.write_text(TINY_EXP.format(epochs=30))
    runs = tmp_path / "runs"
    p = cv_process(exp, tiny_phantom, runs, start_new_session=True)
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
    p2 = cv_process(exp, tiny_phantom, runs)  # the same command again
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
    train.train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET)), x, lab, cfg, tmp_path, 0,
                     validate=lambda m: next(scores))  # fmt: skip
    assert saved == [("best.pt", 2), ("last.pt", 2), ("best.pt", 4), ("last.pt", 4), ("best.pt", 5), ("last.pt", 5)]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["val_ari"] == 0.5
    saved.clear()
    more = dataclasses.replace(cfg, epochs=5, checkpoint_every=3)
    train.train_fold(build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET)), x, lab, more, tmp_path, 0)
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
        model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET))
        train_fold(model, x, lab, dataclasses.replace(cfg, num_workers=workers), tmp_path / str(workers), 0)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


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
        model = build_model(ModelConfig(encoder="tu-mobilenetv3_small_100", **TINY_NET))
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
