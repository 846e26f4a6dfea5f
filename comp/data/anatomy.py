"""The phantom's anatomy in Hounsfield units: a random body frame and level (upper abdomen to pelvis), and the
parts drawn on it (outline, fat and muscle wall, spine and ribs, organs, vessels, bowel loops, lesions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from comp.data.images import SIZE


# Tissues in HU, weakly enhanced (organs and vessels a few dozen HU above muscle), as in the proxy's CT.
AIR, FAT, MUSCLE, SOFT, LIVER, KIDNEY, VESSEL, BONE, MARROW, FLUID = -1000, -100, 45, 35, 60, 60, 90, 800, 250, 8
HU_PER_TEXTURE = 3.3  # a part's `texture` strength is given in units of ~3.3 HU


@dataclass
class Frame:
    """The slice's orientation: image (x, y) = R @ anatomical (u, v) about the centre, u = patient's left."""

    rot: np.ndarray  # 2x2 orthogonal (rotation, possibly with a flip)
    shift: np.ndarray  # anatomical offset of the body centre
    zoom: float = 1.0  # image pixels per anatomical unit (the field of view)

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Image (x, y) of an anatomical point."""
        x, y = self.zoom * (self.rot @ (np.array([u, v]) + self.shift))
        return x + SIZE / 2, y + SIZE / 2


@dataclass
class Blob:
    """A star-shaped ellipse with a wobbly border, in anatomical coordinates (pixels)."""

    u: float
    v: float
    a: float
    b: float
    angle: float = 0.0
    wobble: tuple[tuple[float, float], ...] = ()  # (amplitude, phase) for harmonics 2, 3, ...

    def extent(self) -> float:
        """Radius of a circle that contains the blob."""
        return max(self.a, self.b) * (1 + sum(abs(a) for a, _ in self.wobble)) + 2

    def mask(self, frame: Frame) -> tuple[tuple[slice, slice], np.ndarray]:
        """The blob rasterised in image space: (window, boolean mask inside the window)."""
        cx, cy = frame.to_image(self.u, self.v)
        r = self.extent() * frame.zoom
        x0, x1 = max(0, int(cx - r)), min(SIZE, int(cx + r) + 1)
        y0, y1 = max(0, int(cy - r)), min(SIZE, int(cy + r) + 1)
        if x1 <= x0 or y1 <= y0:
            return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), bool)
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        # Image offsets -> anatomical axes -> the blob's own axes, scaled to the unit circle: one linear map.
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        m = np.array([[ca / self.a, sa / self.a], [-sa / self.b, ca / self.b]]) @ frame.rot.T / frame.zoom
        pu = m[0, 0] * dx + m[0, 1] * dy
        pv = m[1, 0] * dx + m[1, 1] * dy
        rho2 = pu * pu + pv * pv
        win = (slice(y0, y1), slice(x0, x1))
        if not self.wobble:
            return win, rho2 <= 1
        # Border radius 1 + sum_k amp_k cos(k phi + phase_k), with e^{ik phi} by repeated products.
        unit = (pu + 1j * pv) / np.sqrt(np.maximum(rho2, 1e-12))
        unit = unit.astype(np.complex64)
        power = unit * unit
        edge = np.ones_like(rho2)
        for amp, ph in self.wobble:
            edge += amp * (power * complex(math.cos(ph), math.sin(ph))).real
            power *= unit
        return win, rho2 <= edge * edge


@dataclass
class Part:
    """One painted structure: its shape, grey level, texture strength and whether annotators mark it."""

    blob: Blob
    grey: float
    texture: float = 6.0  # x HU_PER_TEXTURE
    annotated: bool = True
    group: str = ""  # parts with the same non-empty group share one instance id
    halo: float = 0.0  # width (px) of a fat rim painted first, so neighbours stay apart


class Anatomy:
    """Random anatomy of one slice, built part by part in painting order."""

    def __init__(self, rng: np.random.Generator, level: float, novel: bool) -> None:
        self.rng = rng
        self.level = level
        self.novel = novel
        self.parts: list[Part] = []

    def wob(self, n: int = 3, amp: float = 0.06) -> tuple[tuple[float, float], ...]:
        """Random border wobble."""
        return tuple((float(self.rng.normal(0, amp)), float(self.rng.uniform(0, 2 * math.pi))) for _ in range(n))

    def add(self, blob: Blob, grey: float, halo: float | None = None, **kw) -> None:
        """Append a part with a little grey-level variation; annotated parts get a fat rim unless halo=0."""
        if halo is None:
            halo = float(self.rng.uniform(1.5, 4)) if kw.get("annotated", True) else 0.0
        self.parts.append(Part(blob, float(grey + self.rng.normal(0, 12)), halo=halo, **kw))

    def build(self) -> list[Part]:
        """Draw the whole anatomy for this level."""
        r, z = self.rng, self.level
        A = r.uniform(150, 215)  # body half-width
        B = A * r.uniform(0.62, 0.8)  # body half-depth
        # Anatomical frame: u to the patient's left, v anterior (up in a standard display).
        self.add(Blob(0, -B - 14, A * 1.1, 9), -400, texture=2, annotated=False)  # table
        self.add(Blob(0, 0, A, B, 0, self.wob(4, 0.03)), FAT, texture=5, annotated=False)
        wall = r.uniform(0.86, 0.9)
        self.add(Blob(0, 0, A * wall, B * wall, 0, self.wob(3, 0.02)), MUSCLE, annotated=False)
        inner = wall - r.uniform(0.05, 0.08)
        self.add(Blob(0, 0, A * inner, B * inner, 0, self.wob(3, 0.02)), FAT + 10, texture=5, annotated=False)
        self._spine(A, B)
        if z < 0.55:
            self._ribs(A * inner, B * inner)
        if z < 0.65:
            self._liver(A * inner, B * inner)
        if z < 0.4:
            self._spleen_stomach(A * inner, B * inner)
        if 0.2 < z < 0.75:
            self._kidneys(B)
        self._vessels(B)
        if z > 0.3:
            self._bowel(A * inner, B * inner)
        if z > 0.7:
            self._pelvis(A * inner, B * inner)
        if self.novel and r.random() < 0.5:
            # A structure type that never appears in training: a hyperdense node beside the aorta.
            self.add(Blob(r.uniform(-40, 40), -B * 0.2, r.uniform(8, 14), r.uniform(7, 12), 0, self.wob()), 300)
        return self.parts

    def _spine(self, A: float, B: float) -> None:
        """Vertebral body, spinous process and paired paraspinal muscles (touching at the midline)."""
        r = self.rng
        vv = -B * r.uniform(0.45, 0.55)
        rv = r.uniform(18, 26)
        self.spine = (vv, rv)
        m_a, m_b = r.uniform(28, 40), r.uniform(18, 26)
        for side in (-1, 1):
            self.add(Blob(side * m_a * 0.98, vv - rv - m_b * 0.9, m_a, m_b, side * 0.2, self.wob(2, 0.04)), MUSCLE + 5, halo=0)
        self.add(Blob(0, vv - rv - 14, 5, 12), BONE - 150, texture=3, halo=0)  # spinous process, between the muscles
        self.add(Blob(0, vv, rv, rv * 0.9), BONE, texture=3, group="vertebra")
        self.add(Blob(0, vv, rv * 0.8, rv * 0.72), MARROW, texture=10, group="vertebra", halo=0)
        if self.level > 0.3:  # psoas muscles grow beside the vertebral body, touching it
            ps = r.uniform(14, 22) * (0.6 + self.level)
            for side in (-1, 1):
                self.add(Blob(side * (rv + ps * 0.8), vv + 4, ps, ps * 0.8, 0, self.wob(2, 0.05)), MUSCLE + 10, halo=0)

    def _ribs(self, a: float, b: float) -> None:
        """Small bright rib cross-sections just inside the abdominal wall."""
        r = self.rng
        for t in r.uniform(-2.6, -0.5, r.integers(2, 5)).tolist() + r.uniform(0.5, 2.6, r.integers(2, 5)).tolist():
            ang = -math.pi / 2 + t
            u, v = a * 1.02 * math.sin(ang + math.pi / 2), b * 1.02 * math.sin(ang)
            self.add(Blob(u, v, r.uniform(5, 9), r.uniform(3, 5), ang), BONE - 250, texture=4)

    def _liver(self, a: float, b: float) -> None:
        """Liver on the patient's right with lesions, and a gallbladder that is never annotated."""
        r, z = self.rng, self.level
        s = 1.0 - z * 1.1
        la, lb = a * r.uniform(0.45, 0.6) * s + 15, b * r.uniform(0.6, 0.8) * s + 12
        lu, lv = -a + la * 0.95, r.uniform(-0.15, 0.1) * b
        self.add(Blob(lu, lv, la, lb, r.uniform(-0.3, 0.3), self.wob(4, 0.07)), LIVER, texture=7)
        self.liver = (lu, lv, la, lb)
        if r.random() < 0.4:
            self.add(Blob(lu + la * 0.5, lv + lb * 0.55, 12, 9), FLUID + 2, texture=2, annotated=False)
        for _ in range(r.choice([0, 0, 1, 1, 2, 3])):  # hypo- or hyperdense lesions inside the liver
            rr = r.uniform(5, min(22, la / 3))
            du, dv = r.uniform(-0.5, 0.5) * la, r.uniform(-0.5, 0.5) * lb
            grey = r.choice([LIVER - 70, LIVER - 45, LIVER + 45])
            self.add(Blob(lu + du, lv + dv, rr, rr * r.uniform(0.7, 1), 0, self.wob(3, 0.08)), grey, texture=4, halo=0)

    def _spleen_stomach(self, a: float, b: float) -> None:
        """Spleen posterior-left and stomach anterior-left (both annotated); the stomach's gas is not."""
        self.add(Blob(a * 0.62, -b * 0.35, a * 0.2, b * 0.35, 0.6, self.wob(3, 0.08)), LIVER + 15, texture=6)
        su, sv = a * 0.35, b * 0.35
        self.add(Blob(su, sv, a * 0.25, b * 0.3, 0, self.wob(3, 0.1)), SOFT, texture=8)
        self.add(Blob(su, sv + b * 0.12, a * 0.16, b * 0.12), AIR + 50, texture=1, annotated=False)

    def _kidneys(self, B: float) -> None:
        """Kidneys beside the spine, brighter cortex; the right one may touch the liver."""
        r = self.rng
        vv, rv = self.spine
        for side in (-1, 1):
            ka, kb = r.uniform(22, 32), r.uniform(30, 42)
            u = side * (rv + r.uniform(40, 60))
            v = vv + r.uniform(5, 25)
            touch = side < 0 and r.random() < 0.35  # the right kidney may abut the liver
            halo = 0.0 if touch else None
            self.add(Blob(u, v, ka, kb, side * r.uniform(0.2, 0.5), self.wob(2, 0.05)), KIDNEY + 30, halo, group=f"kidney{side}")
            self.add(Blob(u + side * 4, v, ka * 0.6, kb * 0.7), KIDNEY - 30, 0.0, group=f"kidney{side}")
            if r.random() < 0.15:  # renal tumour touching the kidney
                self.add(Blob(u - side * ka * 0.8, v + kb * 0.4, 10, 9, 0, self.wob()), KIDNEY - 90, halo=0)

    def _vessels(self, B: float) -> None:
        """Aorta (splitting into iliac arteries low down) and IVC, in front of the spine."""
        r, z = self.rng, self.level
        vv, rv = self.spine
        av = vv + rv + r.uniform(4, 12)
        if z < 0.8:
            ra = r.uniform(9, 14)
            self.add(Blob(r.uniform(4, 14), av + ra * 0.7, ra, ra), VESSEL, texture=3)
            self.add(Blob(-r.uniform(18, 28), av + 6, r.uniform(9, 14), r.uniform(7, 11)), VESSEL - 40, texture=3)
        else:
            for side in (-1, 1):
                self.add(Blob(side * r.uniform(20, 40), av + 5, 8, 8), VESSEL, texture=3)
                self.add(Blob(side * r.uniform(45, 60), av, 9, 7), VESSEL - 40, texture=3)

    def _bowel(self, a: float, b: float) -> None:
        """Small-bowel loops (annotated), often touching each other, some with air."""
        r = self.rng
        n = int(r.integers(3, 12))
        for _ in range(n):
            u, v = r.uniform(-0.55, 0.6) * a, r.uniform(-0.05, 0.7) * b
            rr = r.uniform(12, 30)
            blob = Blob(u, v, rr, rr * r.uniform(0.6, 1.0), r.uniform(0, 3), self.wob(4, 0.1))
            halo = r.uniform(2, 5) if r.random() < 0.9 else 0.0
            self.add(blob, r.uniform(10, 80), texture=9, halo=halo)
            if r.random() < 0.3:
                self.add(Blob(u, v, rr * 0.35, rr * 0.25), AIR + 100, texture=1, annotated=False)

    def _pelvis(self, a: float, b: float) -> None:
        """Iliac bones with gluteal muscles behind them, and the bladder."""
        r = self.rng
        for side in (-1, 1):
            iu, iv = side * a * r.uniform(0.55, 0.7), -b * r.uniform(0.2, 0.35)
            self.add(Blob(iu - side * 10, iv - 30, a * 0.22, b * 0.3, side * 0.5, self.wob(2, 0.04)), MUSCLE + 12)
            self.add(Blob(iu, iv, a * 0.1, b * 0.35, side * 0.5, self.wob(2, 0.05)), BONE - 100, texture=5, halo=0)
        if self.level > 0.85:
            self.add(Blob(0, b * 0.45, a * r.uniform(0.2, 0.3), b * r.uniform(0.2, 0.3), 0, self.wob()), FLUID)


def random_frame(rng: np.random.Generator) -> Frame:
    """A random slice orientation: any rotation, a flip half the time, a small shift."""
    th = rng.choice([0.0, 0.0, math.pi / 2, math.pi, -math.pi / 2]) + rng.normal(0, 0.15)
    c, s = math.cos(th), math.sin(th)
    # Display convention: anterior up (image y grows downwards), patient's left on the image's right.
    base = np.array([[1.0, 0.0], [0.0, -1.0]])
    rot = np.array([[c, -s], [s, c]]) @ base
    if rng.random() < 0.5:
        rot = rot @ np.array([[-1.0, 0.0], [0.0, 1.0]])
    return Frame(rot, rng.normal(0, 10, 2), float(rng.uniform(1.2, 1.4)))
