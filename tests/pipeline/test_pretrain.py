"""Self-supervised pretraining: the loss falls, the checkpoint fits the segmentation encoder, runs resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from comp.data.phantom import render_slice
from comp.nets.models import ModelConfig, build_model
from comp.pipeline.pretrain import PRETEXTS, SSLConfig, load_ssl_config, pretrain

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

MODEL = ModelConfig(encoder="tu-mobilenetv3_small_100", decoder_channels=[16, 8, 8, 8, 8], embedding_dim=4)


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    return np.stack([render_slice(100 + i)[0] for i in range(16)])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mim", "vicregl"])
def test_a_few_steps_lower_the_loss(method: str, slices: np.ndarray, tmp_path: Path) -> None:
    cfg = SSLConfig(method=method, model=MODEL, resolution=64, crop=64, epochs=6, batch_size=8, lr=3e-3, patch=8, warmup_epochs=0.5)
    ck = pretrain(cfg, slices, tmp_path)
    hist = [h["loss"] for h in __import__("json").loads((tmp_path / "history.json").read_text())]
    # The second half's mean, not the last epoch: two batches an epoch make a single epoch's loss noisy (vicregl's
    # sixth sat above its first while its second to fifth were below).
    assert len(hist) == 6 and np.mean(hist[3:]) < hist[0], hist
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # The checkpoint changes exactly the encoder of a segmentation model built from the same config.
    torch.manual_seed(5)
    seg = build_model(ModelConfig(**{**MODEL.__dict__, "encoder_weights": str(ck)}))
    torch.manual_seed(5)
    plain = build_model(MODEL)
    enc = torch.load(ck, weights_only=False)["encoder"]
    for k, v in seg.state_dict().items():
        if k.startswith("net.encoder."):
            assert torch.equal(v, enc[k[len("net.encoder."):]])
        else:
            assert torch.equal(v, plain.state_dict()[k]), k


def test_pretraining_resumes(slices: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = SSLConfig(method="mim", model=MODEL, resolution=64, crop=64, epochs=2, batch_size=8, patch=8)
    pretrain(cfg, slices, tmp_path)
    cfg.epochs = 3
    pretrain(cfg, slices, tmp_path)
    assert "resuming from" in capsys.readouterr().out
    assert len(__import__("json").loads((tmp_path / "history.json").read_text())) == 3


def test_bad_ssl_config(tmp_path: Path) -> None:
    from comp.core.errors import UserError

    p = tmp_path / "ssl.yaml"
    p.write_text("method: simclr\n")
    with pytest.raises(UserError, match="unknown pretext method 'simclr'"):
        load_ssl_config(str(p))
    p.write_text("method: mim\ncrop: 100\n")
    with pytest.raises(UserError, match="multiple of 32"):
        load_ssl_config(str(p))


@pytest.mark.slow
def test_every_backbone_in_experiments_pretrains_with_both_methods(slices: np.ndarray, tmp_path: Path) -> None:
    from comp.pipeline.config import load_experiment

    resolved = {p.stem: load_experiment(p.stem) for p in sorted(EXPERIMENTS.glob("*.yaml"))}
    unets = {k: {"params": {"model": {"encoder": e.params.model.encoder}}} for k, e in resolved.items() if e.method == "unet"}  # deltas resolved
    methods: dict[str, set[str]] = {}
    for p in sorted((EXPERIMENTS / "pretrain").glob("ssl_*.yaml")):
        cfg = load_ssl_config(str(p))
        methods.setdefault(cfg.model.encoder, set()).add(cfg.method)
    encoders = {raw["params"]["model"]["encoder"] for raw in unets.values()}
    assert len(encoders) >= 4
    for name, raw in unets.items():  # every segmentation backbone has a YAML for each pretext method
        assert methods.get(raw["params"]["model"]["encoder"]) == set(PRETEXTS), name
    for enc in sorted(encoders):
        for method in sorted(PRETEXTS):  # a tiny run of each method; the checkpoint fits the experiments' encoder
            tiny = ModelConfig(encoder=enc, decoder_channels=[16, 8, 8, 8, 8], embedding_dim=4)
            cfg = SSLConfig(method=method, model=tiny, resolution=64, crop=64, epochs=1, batch_size=4, patch=8)
            ck = pretrain(cfg, slices[:8], tmp_path / enc / method)
            enc_state = torch.load(ck, weights_only=False)["encoder"]
            for name, raw in unets.items():
                if raw["params"]["model"]["encoder"] == enc:
                    seg = build_model(ModelConfig(**{**raw["params"]["model"], "encoder_weights": str(ck)}))
                    for k, v in seg.encoder.state_dict().items():
                        assert torch.equal(v, enc_state[k]), (name, method, k)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mim", "vicregl"])
def test_pretraining_draws_the_same_with_loader_workers_and_across_a_resume(method: str, slices: np.ndarray, tmp_path: Path) -> None:
    """Masks and noise come from their own seeded generator on the device, not the sampler's: a loader worker
    (prefetching permutations) and a resume halfway give the losses of one uninterrupted in-process run."""
    import dataclasses
    import json

    cfg = SSLConfig(method=method, model=MODEL, resolution=64, crop=64, epochs=2, batch_size=4, patch=8, max_images=8)
    runs = {}
    for name, c in [("plain", cfg), ("workers", dataclasses.replace(cfg, num_workers=1))]:
        torch.manual_seed(0)
        pretrain(c, slices, tmp_path / name)
        runs[name] = [h["loss"] for h in json.loads((tmp_path / name / "history.json").read_text())]
    torch.manual_seed(0)
    pretrain(dataclasses.replace(cfg, epochs=1), slices, tmp_path / "resumed")
    torch.manual_seed(0)
    pretrain(cfg, slices, tmp_path / "resumed")
    runs["resumed"] = [h["loss"] for h in json.loads((tmp_path / "resumed" / "history.json").read_text())]
    assert runs["workers"] == runs["plain"] and runs["resumed"] == runs["plain"], runs
