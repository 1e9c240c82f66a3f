"""Synthetic mammogram pixels: a compressed breast with parenchyma, pectoral muscle and lesions.

Everything is drawn in a canonical frame where the chest wall is the image's left edge and the
nipple points right (the standard display of a left breast); right breasts are mirrored at the
end. Values are "brighter is denser" (MONOCHROME2 semantics) in [0, 1] until `quantize`.

A lesion is placed in breast coordinates shared by the CC and MLO of one breast (depth from the
chest wall, plus a transverse offset per view), so a finding appears at the same nipple distance
in both views, as radiologists expect when they correlate the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import scipy.fft as sfft
from scipy import special

from models.mammogram import Laterality, View


class LesionType(StrEnum):
    SPICULATED_MASS = "spiculated_mass"
    """Malignant: irregular dense core with radiating spicules."""
    ROUND_MASS = "round_mass"
    """Benign: circumscribed oval (cyst, fibroadenoma)."""
    PLEOMORPHIC_CALCIFICATIONS = "pleomorphic_calcifications"
    """Malignant: a tight cluster of many small bright specks of varied size."""
    COARSE_CALCIFICATIONS = "coarse_calcifications"
    """Benign: a few large round specks."""

    @property
    def malignant(self) -> bool:
        return self in (LesionType.SPICULATED_MASS, LesionType.PLEOMORPHIC_CALCIFICATIONS)


@dataclass(frozen=True)
class Lesion:
    """One finding in breast coordinates, shared by the CC and MLO of its breast."""

    type: LesionType
    depth: float
    """0 at the chest wall, 1 at the nipple."""
    cc_offset: float
    """Transverse position in the CC view in [-1, 1] (lateral to medial)."""
    mlo_offset: float
    """Transverse position in the MLO view in [-1, 1] (superior to inferior)."""
    size_mm: float
    """Mass radius, or calcification cluster radius."""
    seed: int
    """Shape seed: the same lesion has the same shape in both views (up to rotation)."""

    @property
    def malignant(self) -> bool:
        return self.type.malignant


@dataclass(frozen=True)
class Breast:
    """Per-breast anatomy shared by its two views."""

    extent: float
    """Nipple distance from the chest wall as a fraction of the image width."""
    height: float
    """Half-height of the breast at the chest wall (CC) as a fraction of the image height."""
    density: float
    """Fraction of fibroglandular tissue, about 0.1 (fatty) to 0.6 (extremely dense)."""
    lesions: tuple[Lesion, ...] = ()


@dataclass(frozen=True)
class RenderedView:
    """One view's intensities and masks on the image grid (final orientation)."""

    intensity: np.ndarray
    """float32 (rows, cols) in [0, 1], brighter = denser."""
    breast_mask: np.ndarray
    malignant_mask: np.ndarray
    benign_mask: np.ndarray


FAT = 0.30
GLAND = 0.62
MUSCLE = 0.56
SKIN = 0.06
BACKGROUND = 0.004


def random_breast(rng: np.random.Generator) -> Breast:
    return Breast(
        extent=float(rng.uniform(0.62, 0.8)),
        height=float(rng.uniform(0.36, 0.44)),
        density=float(rng.uniform(0.15, 0.55)),
    )


def random_lesion(
    rng: np.random.Generator, *, malignant: bool, kind: LesionType | None = None
) -> Lesion:
    """A lesion of `kind`, or of a random kind with the given malignancy."""
    if kind is None and malignant:
        spiculated = rng.random() < 0.65
        kind = LesionType.SPICULATED_MASS if spiculated else LesionType.PLEOMORPHIC_CALCIFICATIONS
    elif kind is None:
        round_mass = rng.random() < 0.6
        kind = LesionType.ROUND_MASS if round_mass else LesionType.COARSE_CALCIFICATIONS
    elif kind.malignant != malignant:
        raise ValueError(f"a {kind.value} is {'not ' if malignant else ''}malignant")
    size = {
        LesionType.SPICULATED_MASS: (5.0, 10.0),
        LesionType.ROUND_MASS: (5.0, 11.0),
        LesionType.PLEOMORPHIC_CALCIFICATIONS: (3.0, 6.0),
        LesionType.COARSE_CALCIFICATIONS: (4.0, 8.0),
    }[kind]
    return Lesion(
        type=kind,
        depth=float(rng.uniform(0.3, 0.75)),
        cc_offset=float(rng.uniform(-0.6, 0.6)),
        mlo_offset=float(rng.uniform(-0.6, 0.6)),
        size_mm=float(rng.uniform(*size)),
        seed=int(rng.integers(2**31)),
    )


def render_view(
    rng: np.random.Generator,
    breast: Breast,
    *,
    laterality: Laterality,
    view: View,
    rows: int,
    cols: int,
    spacing_mm: float,
) -> RenderedView:
    """Draw one view. `spacing_mm` sets the physical size of lesions and the skin."""
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(cols, dtype=np.float32)[None, :]
    frame = _Frame.for_view(breast, view, rows, cols)
    u, v = frame.breast_coords(y, x)  # u: 0 chest wall .. 1 nipple; v: transverse, 0 on axis
    radius = np.sqrt(u * u + v * v)
    inside = radius < 1.0

    # Compressed thickness: flat in the middle, rolling off over the last ~12 % to the skin.
    edge = np.clip((1.0 - radius) / 0.12, 0.0, 1.0)
    thickness = np.sqrt(edge)

    gland, strands = _parenchyma(rng, frame, rows, cols, breast.density, u, radius)
    tissue = FAT + (GLAND - FAT) * gland + 0.015 * strands

    skin_px = max(1.0, 1.5 / spacing_mm)
    skin_width = skin_px / (frame.scale_px)
    skin = SKIN * np.clip(1.0 - np.abs(1.0 - skin_width - radius) / skin_width, 0.0, 1.0)

    image = thickness * tissue + skin
    if view is View.MLO:
        image = _add_pectoral(image, frame, strands, y, x)
    image = np.where(inside, image, 0.0).astype(np.float32)

    malignant = np.zeros((rows, cols), dtype=bool)
    benign = np.zeros((rows, cols), dtype=bool)
    for lesion in breast.lesions:
        cy, cx = frame.lesion_centre(lesion, view)
        add, mask = _draw_lesion(lesion, view, cy, cx, rows, cols, spacing_mm)
        image += add * inside
        (malignant if lesion.malignant else benign)[...] |= mask & inside

    # Quantum and electronic noise, stronger where fewer photons reach the detector.
    image += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.006)
    image = np.where(inside, image, BACKGROUND).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)

    if laterality is Laterality.RIGHT:
        image, inside = image[:, ::-1], inside[:, ::-1]
        malignant, benign = malignant[:, ::-1], benign[:, ::-1]
    return RenderedView(
        intensity=np.ascontiguousarray(image),
        breast_mask=np.ascontiguousarray(inside),
        malignant_mask=np.ascontiguousarray(malignant),
        benign_mask=np.ascontiguousarray(benign),
    )


def quantize(intensity: np.ndarray, bits_stored: int) -> np.ndarray:
    """[0, 1] → unsigned integers of `bits_stored` bits, in uint16."""
    top = (1 << bits_stored) - 1
    return np.rint(intensity * top).astype(np.uint16)


@dataclass(frozen=True)
class _Frame:
    """Where the breast sits in the canonical (chest wall left) image of one view."""

    centre_row: float
    half_height: float
    extent: float
    tilt: float
    """Radians the breast axis points below horizontal (MLO only)."""
    pectoral: tuple[float, float]
    """Pectoral triangle legs (rows down the chest wall, columns along the top edge)."""

    @property
    def scale_px(self) -> float:
        return min(self.half_height, self.extent)

    @staticmethod
    def for_view(breast: Breast, view: View, rows: int, cols: int) -> _Frame:
        extent = breast.extent * cols
        if view is View.CC:
            return _Frame(rows * 0.5, breast.height * rows, extent, 0.0, (0.0, 0.0))
        return _Frame(
            centre_row=rows * 0.42,
            half_height=breast.height * rows * 1.2,
            extent=extent * 0.95,
            tilt=math.radians(18.0),
            pectoral=(rows * 0.62, cols * 0.3),
        )

    def breast_coords(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dy = y - self.centre_row
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        along = x * c + dy * s
        across = dy * c - x * s
        return (along / self.extent).astype(np.float32), (across / self.half_height).astype(
            np.float32
        )

    def lesion_centre(self, lesion: Lesion, view: View) -> tuple[float, float]:
        offset = lesion.cc_offset if view is View.CC else lesion.mlo_offset
        across = offset * 0.75 * math.sqrt(max(0.0, 1.0 - lesion.depth**2))
        along = lesion.depth * self.extent
        across_px = across * self.half_height
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        return self.centre_row + along * s + across_px * c, along * c - across_px * s


def _parenchyma(
    rng: np.random.Generator,
    frame: _Frame,
    rows: int,
    cols: int,
    density: float,
    u: np.ndarray,
    radius: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Fibroglandular fraction in [0, 1] and a fine strand texture.

    Both come from one white-noise field filtered to a power-law (1/f^3) spectrum, stretched
    along the breast axis (ducts and ligaments run towards the nipple). The fraction is the
    noise thresholded softly to the requested density, concentrated behind the nipple and
    thinning towards the skin and the chest wall, as breast tissue does.
    """
    spectrum = sfft.rfft2(rng.standard_normal((rows, cols), dtype=np.float32))
    fy = sfft.fftfreq(rows).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(cols).astype(np.float32)[None, :]
    c, s = np.float32(math.cos(frame.tilt)), np.float32(math.sin(frame.tilt))
    f_along, f_across = fx * c + fy * s, fy * c - fx * s
    floor = np.float32(2.0 / max(rows, cols))  # no structure larger than the breast

    def shaped(stretch: float, slope: float, band: float | None) -> np.ndarray:
        f = np.sqrt((f_along * stretch) ** 2 + (f_across / stretch) ** 2)
        weight = np.maximum(f, floor) ** np.float32(-slope)
        if band is not None:
            weight = weight * (1.0 - np.exp(-((f / np.float32(band)) ** 2)))
        out = sfft.irfft2(spectrum * weight, s=(rows, cols)).astype(np.float32)
        return (out - out.mean()) / (out.std() + np.float32(1e-6))

    clouds = shaped(1.8, 1.5, None)
    strands = shaped(2.5, 1.0, 0.02)
    envelope = np.exp(-(((u - 0.45) / 0.4) ** 2)) * np.clip((1.0 - radius) / 0.2, 0.0, 1.0)
    threshold = np.float32(special.ndtri(1.0 - min(0.95, density * 1.6)))
    gland = envelope / (1.0 + np.exp(-(clouds - threshold) * 1.6))
    return gland.astype(np.float32), (strands * envelope).astype(np.float32)


def _add_pectoral(
    image: np.ndarray, frame: _Frame, texture: np.ndarray, y: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """The pectoral muscle: a bright triangle in the upper chest-wall corner with a slightly
    convex edge, brightest towards the axilla, as on an MLO."""
    down, across = frame.pectoral
    t = y / down + x / across
    bulge = 0.06 * np.sin(np.clip(y / down, 0.0, 1.0) * math.pi)
    muscle = np.clip((1.0 + bulge - t) / 0.02, 0.0, 1.0)
    value = MUSCLE * (1.0 + 0.1 * np.clip(1.0 - t, 0.0, 1.0)) + 0.02 * texture
    return image * (1.0 - muscle) + value * muscle


def _draw_lesion(
    lesion: Lesion, view: View, cy: float, cx: float, rows: int, cols: int, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """The lesion's added density and its mask, on the full grid (only a patch is non-zero)."""
    shape = np.random.default_rng(lesion.seed)
    turn = 0.0 if view is View.CC else math.radians(35.0)
    r_px = max(2.0, lesion.size_mm / spacing_mm)
    reach = r_px * (2.6 if lesion.type is LesionType.SPICULATED_MASS else 1.3) + 2
    top, left = max(0, int(cy - reach)), max(0, int(cx - reach))
    bottom, right = min(rows, int(cy + reach) + 2), min(cols, int(cx + reach) + 2)
    add = np.zeros((rows, cols), dtype=np.float32)
    mask = np.zeros((rows, cols), dtype=bool)
    if bottom <= top or right <= left:
        return add, mask
    py = np.arange(top, bottom, dtype=np.float32)[:, None] - cy
    px = np.arange(left, right, dtype=np.float32)[None, :] - cx
    rho = np.sqrt(py * py + px * px)
    theta = np.arctan2(py, px) - turn

    if lesion.type in (LesionType.SPICULATED_MASS, LesionType.ROUND_MASS):
        density, region = _mass(shape, lesion.type, rho, theta, r_px)
    else:
        density, region = _calcifications(shape, lesion.type, py, px, r_px, spacing_mm, turn)
    add[top:bottom, left:right] = density
    mask[top:bottom, left:right] = region
    return add, mask


def _mass(
    shape: np.random.Generator, kind: LesionType, rho: np.ndarray, theta: np.ndarray, r_px: float
) -> tuple[np.ndarray, np.ndarray]:
    if kind is LesionType.ROUND_MASS:
        aspect = shape.uniform(0.75, 1.0)
        axis = shape.uniform(0, math.pi)
        local = rho * np.sqrt(np.cos(theta - axis) ** 2 + (np.sin(theta - axis) / aspect) ** 2)
        core = np.clip(1.0 - (local / r_px) ** 2, 0.0, 1.0)
        density = 0.16 * np.sqrt(core)
        return density.astype(np.float32), local <= r_px

    # Irregular core: the radius wobbles with angle.
    wobble = np.zeros_like(theta)
    for k in (3, 5, 7):
        wobble += shape.uniform(0.04, 0.1) * np.sin(k * theta + shape.uniform(0, 2 * math.pi))
    edge = r_px * (1.0 + wobble)
    core = np.clip(1.0 - (rho / edge) ** 2, 0.0, 1.0)
    density = 0.2 * np.sqrt(core)

    # Spicules: thin lines radiating out to ~2.5 radii, fading with distance.
    width = max(1.0, r_px * 0.08)
    spicules = np.zeros_like(rho)
    for angle in shape.uniform(0, 2 * math.pi, size=int(shape.integers(8, 15))):
        length = r_px * shape.uniform(1.6, 2.5)
        along = rho * np.cos(theta - angle)
        off = np.abs(rho * np.sin(theta - angle))
        on = (along > 0) & (along < length)
        fade = np.clip(1.0 - along / length, 0.0, 1.0)
        line = np.clip(1.0 - off / width, 0.0, 1.0) * fade
        spicules = np.maximum(spicules, np.where(on, line, 0.0))
    density = np.maximum(density, 0.15 * spicules)
    region = (rho <= edge) | (spicules > 0.25)
    return density.astype(np.float32), region


def _calcifications(
    shape: np.random.Generator,
    kind: LesionType,
    py: np.ndarray,
    px: np.ndarray,
    r_px: float,
    spacing_mm: float,
    turn: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Bright specks in a cluster; the mask is the cluster's outline, as clusters are annotated."""
    pleomorphic = kind is LesionType.PLEOMORPHIC_CALCIFICATIONS
    count = int(shape.integers(10, 25) if pleomorphic else shape.integers(3, 7))
    speck_mm = (0.15, 0.4) if pleomorphic else (0.5, 1.2)
    density = np.zeros(np.broadcast_shapes(py.shape, px.shape), dtype=np.float32)
    c, s = math.cos(turn), math.sin(turn)
    reach = 0.0
    for _ in range(count):
        ang, dist = shape.uniform(0, 2 * math.pi), r_px * math.sqrt(shape.uniform(0, 0.8))
        sx, sy = dist * math.cos(ang), dist * math.sin(ang)
        sx, sy = sx * c - sy * s, sx * s + sy * c
        radius = max(0.7, shape.uniform(*speck_mm) / spacing_mm)
        d = np.sqrt((py - sy) ** 2 + (px - sx) ** 2)
        density = np.maximum(density, 0.35 * np.clip(1.2 - d / radius, 0.0, 1.0))
        reach = max(reach, dist + radius)
    rho = np.sqrt(py * py + px * px)
    return density, rho <= reach + 1.5
