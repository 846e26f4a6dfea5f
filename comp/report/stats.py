"""`comp data stats DIR`: the profile of a data set in the challenge layout, to hold stand-ins against the challenge.

Slice counts, regions per annotated slice, annotated share of pixels, region sizes, how many regions
touch another one, histogram landmarks with the HU window they imply, and two reference scores on the
annotated slices: the official watershed baseline and the oracle (perfect foreground split into
connected components), the ceiling of any method that only finds the foreground.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from comp.core.metric import image_score, image_scores
from comp.core.parallel import pmap
from comp.data.calibration import evenly_spaced, histogram, landmarks, survey
from comp.data.contrast import ContrastParams, resolve
from comp.data.dataset import Dataset
from comp.data.images import N_PIXELS, image_names
from comp.data.labels import WINDOWS_CSV, read_windows
from comp.methods.baselines import OfficialWatershedParams, official_watershed
from comp.methods.merge import majority
from comp.regions.ops import relabel_uint8
from comp.regions.superpixels import SuperpixelParams, superpixels

# The challenge's published figures (data challenge page and the seed report); None where unpublished.
CHALLENGE = {
    "train slices": 2000, "annotated slices": 400, "test slices": 500, "regions per slice": "18 ± 7",
    "annotated share": "19%", "mean region size": "~1%", "touching share": "most separated",
    "official baseline ARI": "0.14",
    "windowed": "per slice (2025 PNGs)", "HU per grey level 5/50/95%": "4..32 (2025 PNGs)",
}  # fmt: skip


@dataclass
class Stats:
    """A data set's profile (shares and sizes as fractions of the 512x512 image)."""

    name: str
    train_slices: int
    annotated_slices: int
    test_slices: int
    regions_mean: float
    regions_std: float
    annotated_share: float
    region_size_q: dict  # quantile -> share of the image
    region_size_mean: float
    touching_share: float  # regions with a 4-neighbour pixel in another region
    air: float | None
    fat: float
    soft: float
    bone: float
    implied_window: tuple[float, float]
    scored_slices: int
    baseline_ari: float
    oracle_ari: float
    superpixels: dict = field(default_factory=dict)  # h -> [superpixels per slice, ceiling ARI] (asked with --superpixels)
    windows: dict = field(default_factory=dict)  # the slices' own calibrations: spread, per-slice verdict, fallbacks, accuracy
    correlation_px: float = float("nan")  # effective resolution: noise correlation length in pixels (median over slices)
    equal_neighbours: float = float("nan")  # posterization: flat tissue's side-by-side pixels of one grey level (median)


def touching(lab: np.ndarray) -> tuple[int, int]:
    """(regions touching another region, regions) of one instance map."""
    touch = set()
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1, :], lab[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        touch.update(np.unique(a[m]).tolist())
        touch.update(np.unique(b[m]).tolist())
    return len(touch), len(np.unique(lab[lab > 0]))


def oracle_cc(lab: np.ndarray) -> np.ndarray:
    """The perfect foreground split into connected components (4-connectivity, as the regions are)."""
    return relabel_uint8(ndi.label(lab > 0)[0])


def _baseline(img: np.ndarray) -> np.ndarray:
    """The official watershed baseline with its own defaults (a pool job)."""

    return official_watershed(img, OfficialWatershedParams())


def _ceiling(item: tuple, h: float) -> tuple[int, float]:
    """Superpixels of one stretched slice and the ARI of giving each its majority true structure (a pool job)."""

    image, truth = item
    sp = superpixels(image, SuperpixelParams(h=h))
    return int(sp.max()), image_score(truth, majority(sp, truth)[0][sp].astype(np.uint8))


def superpixel_ceilings(x: np.ndarray, y: np.ndarray, x_all: np.ndarray, hs: list[float], workers: int = 0) -> dict:
    """For each superpixel depth h: superpixels per slice and the ceiling of merging them (every superpixel given
    its majority structure), on the slices stretched to the `auto` soft-tissue window found on `x_all`."""

    stretched = resolve(ContrastParams(window="auto"), x_all, "superpixels").stretch(x)
    out = {}
    for h in hs:
        r = np.array(pmap(_ceiling, list(zip(stretched, y)), h, workers=workers, desc=f"superpixels h {h}"))
        out[str(h)] = [float(r[:, 0].mean()), float(r[:, 1].mean())]
    return out


def window_spread(x: np.ndarray, truth: np.ndarray | None = None) -> dict:
    """The HU windows the slices' own landmarks imply: their spread, whether the data looks windowed per slice, how many
    slices lack landmarks, and (with each slice's true window, a stand-in's windows.csv) how many are recovered within
    5% and 2% of their width."""

    sv = survey(x, max_images=len(x))
    ok = np.isfinite(sv.windows[:, 0])
    lo, hi = sv.windows[ok, 0], sv.windows[ok, 1]
    q = lambda v: [round(float(t)) for t in np.quantile(v, [0.05, 0.5, 0.95])] if len(v) else []  # noqa: E731
    out = {"per_slice": bool(sv.per_slice), "slices": len(x), "lacking_landmarks": sv.failed, "low_end_hu_5_50_95": q(lo),
           "high_end_hu_5_50_95": q(hi), "hu_per_grey_5_50_95": [round(v, 1) for v in np.quantile((hi - lo) / 255, [0.05, 0.5, 0.95])] if ok.any() else [],
           "air_grey_iqr": round(sv.air_iqr, 1), "width_iqr": round(sv.width_iqr, 3)}  # fmt: skip
    if truth is not None:
        err = np.max(np.abs(sv.windows - truth), axis=1) / (truth[:, 1] - truth[:, 0])
        out["within_5%"] = float(np.mean(np.nan_to_num(err, nan=1.0) < 0.05))
        out["within_2%"] = float(np.mean(np.nan_to_num(err, nan=1.0) < 0.02))
    return out


def flat_tissue(f: np.ndarray) -> np.ndarray:
    """Pixels inside the body, away from its edge, where the smoothed gradient is below its median there: where a
    slice's texture is its noise rather than its anatomy."""
    body = ndi.binary_erosion(f > np.quantile(f, 0.5), iterations=8)
    if not body.any():
        return body
    g = ndi.gaussian_gradient_magnitude(f, 2.0)
    return body & (g < np.quantile(g[body], 0.5))


def equal_neighbours(img: np.ndarray) -> float:
    """Share of side-by-side pixel pairs of flat tissue with the same grey level: high when the grey step is coarser
    than the noise (a smooth slice rendered through a wide window is posterized, and differences finer than one
    step are gone: the one-window proxy 0.34, the same slices windowed per slice 0.62, the phantom 0.13, per slice 0.24)."""
    flat = flat_tissue(img.astype(np.float32))
    m = flat[:, :-1] & flat[:, 1:]
    return float((img[:, :-1][m] == img[:, 1:][m]).mean()) if m.sum() >= 500 else float("nan")


def correlation_length(img: np.ndarray) -> float:
    """Pixels over which a slice's fine texture (noise) stays correlated: the lag where the autocorrelation of its
    high-pass residual inside the body falls to one half (~1-2 px on a native slice, ~4-6 on 3 mm voxels stretched 4x)."""
    f = img.astype(np.float32)
    r = f - ndi.uniform_filter(f, 15)
    flat = flat_tissue(f)
    if flat.sum() < 500:
        return float("nan")
    prev = 1.0
    for lag in range(1, 16):
        m = flat[:, :-lag] & flat[:, lag:]
        a, b = r[:, :-lag][m], r[:, lag:][m]
        rho = float(np.corrcoef(a, b)[0, 1]) if len(a) > 50 else float("nan")
        if not rho > 0.5:
            return lag - 1 + (prev - 0.5) / max(prev - rho, 1e-6) if np.isfinite(rho) else float("nan")
        prev = rho
    return 15.0


def data_stats(data: Dataset, images: int = 0, workers: int = 0, superpixel_h: list[float] | None = None) -> Stats:
    """Profile a data set; the reference scores use up to `images` evenly spaced annotated slices (0 = all)."""
    ann = data.annotated
    y = data.y_train[ann]
    regions, sizes, touch = [], [], [0, 0]
    for lab in y:
        cnt = np.bincount(lab.ravel(), minlength=256)[1:]
        regions.append(int((cnt > 0).sum()))
        sizes += (cnt[cnt > 0] / N_PIXELS).tolist()
        t, n = touching(lab)
        touch[0] += t
        touch[1] += n
    share = float((y > 0).mean()) if len(y) else 0.0
    step = max(1, len(ann) // images) if images else 1
    pick = np.arange(len(ann))[::step][: images or None]
    base = np.stack(pmap(_baseline, data.x_train[ann[pick]], workers=workers, desc="official baseline")) if len(pick) else y[:0]
    oracle = np.stack([oracle_cc(t) for t in y[pick]]) if len(pick) else y[:0]
    marks = landmarks(histogram(data.x_train), data.root)
    q = np.quantile(sizes, [0.1, 0.5, 0.9]) if sizes else [0.0] * 3
    return Stats(
        name=data.name,
        train_slices=len(data.x_train),
        annotated_slices=len(ann),
        test_slices=len(data.x_test) if data.has_test_images else 0,
        regions_mean=float(np.mean(regions)) if regions else 0.0,
        regions_std=float(np.std(regions)) if regions else 0.0,
        annotated_share=share,
        region_size_q={"10%": float(q[0]), "50%": float(q[1]), "90%": float(q[2])},
        region_size_mean=float(np.mean(sizes)) if sizes else 0.0,
        touching_share=touch[0] / max(touch[1], 1),
        air=marks.air,
        fat=marks.fat,
        soft=marks.soft,
        bone=marks.bone,
        implied_window=tuple(round(v) for v in marks.window()),
        scored_slices=len(pick),
        baseline_ari=float(image_scores(y[pick], base).mean()) if len(pick) else float("nan"),
        oracle_ari=float(image_scores(y[pick], oracle).mean()) if len(pick) else float("nan"),
        superpixels=superpixel_ceilings(data.x_train[ann[pick]], y[pick], data.x_train, superpixel_h, workers) if superpixel_h and len(pick) else {},
        windows=window_spread(data.x_train, read_windows(data.root / WINDOWS_CSV, image_names(len(data.x_train)))),
        correlation_px=float(np.nanmedian([correlation_length(s) for s in evenly_spaced(data.x_train, 50)])),
        equal_neighbours=float(np.nanmedian([equal_neighbours(s) for s in evenly_spaced(data.x_train, 50)])),
    )


def rows(s: Stats) -> dict[str, str]:
    """The profile as labelled, formatted cells (the same labels as CHALLENGE)."""
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    air = "clipped" if s.air is None else f"{s.air:.0f}"
    return {
        "train slices": str(s.train_slices),
        "annotated slices": str(s.annotated_slices),
        "test slices": str(s.test_slices),
        "regions per slice": f"{s.regions_mean:.1f} ± {s.regions_std:.1f}",
        "annotated share": f"{100 * s.annotated_share:.1f}%",
        "mean region size": pct(s.region_size_mean),
        "region size 10/50/90%": " / ".join(pct(v) for v in s.region_size_q.values()),
        "touching share": f"{100 * s.touching_share:.0f}% of regions touch another",
        "grey landmarks air/fat/soft/bone": f"{air} / {s.fat:.0f} / {s.soft:.0f} / {s.bone:.0f}",
        "implied HU window": f"{s.implied_window[0]}..{s.implied_window[1]}",
        "official baseline ARI": f"{s.baseline_ari:.3f}",
        "oracle fg + CC ARI": f"{s.oracle_ari:.3f}",
        "scored slices": str(s.scored_slices),
        **{f"superpixels h={h}: per slice / ceiling ARI": f"{n:.0f} / {c:.3f}" for h, (n, c) in s.superpixels.items()},
        **_window_rows(s.windows),
        "noise correlation length": f"{s.correlation_px:.1f} px",
        "flat tissue's equal neighbours (posterized when high)": f"{100 * s.equal_neighbours:.0f}%",
    }


def _window_rows(w: dict) -> dict[str, str]:
    """The per-slice window survey as cells."""
    if not w:
        return {}
    span = lambda v: f"{v[0]} / {v[1]} / {v[2]}" if v else "—"  # noqa: E731
    out = {"windowed": "per slice" if w["per_slice"] else "one window", "slices' window low end HU 5/50/95%": span(w["low_end_hu_5_50_95"]),
           "slices' window high end HU 5/50/95%": span(w["high_end_hu_5_50_95"]), "HU per grey level 5/50/95%": span(w["hu_per_grey_5_50_95"]),
           "slices lacking landmarks (take the data set's calibration)": f"{w['lacking_landmarks']} of {w['slices']}"}  # fmt: skip
    if "within_5%" in w:
        out["windows recovered within 5% / 2% (windows.csv)"] = f"{100 * w['within_5%']:.1f}% / {100 * w['within_2%']:.1f}%"
    return out


def render_text(s: Stats) -> str:
    """Aligned `label: value` lines of one profile."""
    r = rows(s)
    w = max(map(len, r))
    return f"{s.name}\n" + "".join(f"  {k:<{w}}  {v}\n" for k, v in r.items())


def render_markdown(profiles: list[Stats]) -> str:
    """A table: the challenge's published figures beside each profile."""
    cells = [rows(s) for s in profiles]
    head = "| | challenge (published) | " + " | ".join(s.name for s in profiles) + " |\n"
    head += "|---|---|" + "---|" * len(profiles) + "\n"
    keys = list(dict.fromkeys(k for c in cells for k in c))  # a row only some data sets have (windows.csv) shows '—' elsewhere
    body = "".join(f"| {k} | {CHALLENGE.get(k, '—')} | " + " | ".join(c.get(k, "—") for c in cells) + " |\n" for k in keys)
    return head + body


def to_json(profiles: list[Stats]) -> str:
    """Machine-readable profiles."""
    return json.dumps([asdict(s) for s in profiles], indent=1)
