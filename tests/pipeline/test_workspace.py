"""The run folder type: layout, key parsing, quantised map storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from comp.core.errors import UserError
from comp.core.store import load_maps, quantise, save_maps, write_maps
from comp.pipeline.workspace import RunDir, RunKey


def _maps(n: int = 5, c: int = 7, r: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 2, (n, c, r, r)).astype(np.float32)
    m[:, :3] = rng.random((n, 3, r, r))  # probabilities
    m[1, 4] = 0.25  # a constant channel
    return m


def test_quantised_maps_decode_within_half_a_step(tmp_path: Path) -> None:
    m = _maps()
    path = tmp_path / "oof" / "fold0_maps.npy"
    save_maps(path, m)
    got = load_maps(path)
    assert got.values.dtype == np.uint8 and got.shape == m.shape
    step = (m.max(axis=(2, 3)) - m.min(axis=(2, 3))) / 255
    err = np.abs(got[:] - m).max(axis=(2, 3))
    assert (err <= step / 2 + 1e-5).all()
    assert np.allclose(got[1][4], 0.25)  # a constant channel comes back exactly
    assert np.allclose(got[2], got[:][2]) and len(list(got)) == 5
    assert path.stat().st_size < m.astype(np.float16).nbytes * 0.6  # half of float16, plus a header


def test_chunked_writer_matches_whole_array_and_leaves_nothing_on_a_crash(tmp_path: Path) -> None:
    m = _maps(n=9)
    write_maps(tmp_path / "a.npy", 9, lambda sl: m[sl], chunk=4)
    save_maps(tmp_path / "b.npy", m)
    assert np.array_equal(load_maps(tmp_path / "a.npy").values, load_maps(tmp_path / "b.npy").values)

    def crash(sl: slice) -> np.ndarray:
        if sl.start >= 4:
            raise RuntimeError("killed")
        return m[sl]

    with pytest.raises(RuntimeError):
        write_maps(tmp_path / "c.npy", 9, crash, chunk=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a_scale.npy", "b.npy", "b_scale.npy"]


def test_float16_maps_of_older_runs_still_load_and_a_missing_scale_is_a_clear_error(tmp_path: Path) -> None:
    m = _maps().astype(np.float16)
    np.save(tmp_path / "old.npy", m)
    assert np.array_equal(load_maps(tmp_path / "old.npy")[:], m.astype(np.float32))
    np.save(tmp_path / "q.npy", quantise(m)[0])
    with pytest.raises(UserError, match="q_scale.npy"):
        load_maps(tmp_path / "q.npy")


def test_run_folder_layout_and_key(tmp_path: Path) -> None:
    key = RunKey("abcdef12", "0fcfb2", 3)
    run = RunDir.create(tmp_path, "exp", key)
    assert run.key == key and run.experiment == "exp" and not run.finished
    run.write_config({"cv": {"folds": 3}})
    assert RunDir.create(tmp_path, "exp", key) == run  # unfinished: resumed, not a new id
    for f in range(3):
        run.write_fold(f, np.array([f]), np.zeros((1, 4, 4), np.uint8), np.array([0.5]), {"fold": f, "fitted": {"t": f % 2}})
    assert [run.fold_done(f) for f in range(3)] == [True] * 3
    ids, folds = run.oof_index()
    assert ids.tolist() == [0, 1, 2] and folds.tolist() == [0, 1, 2]
    assert [i["fitted"]["t"] for i in run.fold_infos()] == [0, 1, 0]
    with pytest.raises(UserError, match="not a finished CV run"):
        run.summary()
    run.write_summary({"mean_ari": 0.5})
    assert run.finished and list(RunDir.finished_under(tmp_path)) == [run]
    assert RunDir.create(tmp_path, "exp", key) != run  # finished: a new run id
    assert RunDir(tmp_path / "exp" / "not-a-run").key is None


def test_ensemble_candidates_are_the_newest_run_of_each_config_at_the_usual_fold_count() -> None:
    from comp.pipeline.oof import latest_per_config

    runs = [Path(f"runs/{e}/{t}-{d}-0fcfb2-k{k}") for e, t, d, k in [
        ("a", "20260102-000000", "d1", 3), ("a", "20260101-000000", "d1", 3), ("a", "20260101-000000", "d2", 3),
        ("b", "20260101-000000", "d3", 5), ("c", "20260101-000000", "d4", 3)]]  # fmt: skip
    assert latest_per_config(runs + [Path("runs/x/odd")]) == [runs[0], runs[2], runs[4]]


def test_quantise_gives_the_reference_codes_with_nan_and_infinities_and_leaves_its_input() -> None:
    """The in-place quantiser equals the plain definition (nan_to_num, then per-channel min/max codes) bit for bit,
    with a NaN pixel, an infinite one and a whole NaN channel, on float16 and float32 maps."""
    m = _maps().astype(np.float16)
    m[1, 3, 5, 5], m[2, 4, 0, 0], m[0, 0] = np.nan, np.inf, np.nan
    for maps in (m, m.astype(np.float32)):
        before = maps.copy()
        ref = np.nan_to_num(maps.astype(np.float32))
        lo, hi = ref.min(axis=(2, 3)), ref.max(axis=(2, 3))
        step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        want = np.clip(np.rint((ref - lo[..., None, None]) / step[..., None, None]), 0, 255).astype(np.uint8)
        codes, scale = quantise(maps)
        assert np.array_equal(codes, want) and np.array_equal(scale, np.stack([lo, step], -1))
        assert np.array_equal(maps, before, equal_nan=True)
