"""GMIC's inference preprocessing, from a `Mammogram` to the model input and its `Geometry`.

The steps follow the public pipeline (`reference/gmic/ARCHITECTURE.md` §9), with every pixel
operation expressed as a `Geometry` step so that maps and boxes go back to the source exactly:

1. **Flip** so the breast faces right: chest wall at column 0, nipple towards higher columns.
   GMIC mirrors R views, assuming the usual display (L views face right, R views face left).
   We decide from the image itself: PatientOrientation's row direction when present ("A…":
   columns run towards the nipple, already facing right; "P…": mirror), else the half of the
   image holding more signal is the chest-wall side, else (a blank image) the laterality.
   Spec `orientation: "laterality"` reproduces GMIC's rule exactly (mirror R views).
2. **Crop stage** on the right-facing image: mask `pixels > 0`, erode it `crop_iterations`
   times, keep the largest 4-connected component, dilate it back, take its bounding box plus
   up to `crop_buffer` pixels above, below and on the nipple side. It also yields the
   right-most tissue column (searched below the top third) and the bottom-most tissue row.
3. **Resize** by `scale` (only when the window is smaller than the published 2944x1920).
4. **Window centre**: CC views slide the window over rows to cover the most non-zero pixels
   (ties: closest to the image centre), with its right edge at the right-most tissue column;
   MLO views anchor the window at the bottom-most and right-most tissue.
5. **Pad and window**: a short CC image is zero-padded evenly above and below, a short MLO
   image below only, a narrow image on the right (nipple side); the window is then moved to
   lie inside the padded image.
6. **Standardise** the whole window, padding included: subtract the mean, divide by the
   standard deviation (at least 1e-5), in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PlainValidator, field_validator

from ..config import IntPair, StrictConfig
from ..family import Prepared
from ..geometry import Crop, Flip, Geometry, Pad, Resize, Step
from ..mammogram import Laterality, Mammogram, MammogramError, View
from .network import PUBLISHED_INPUT_SHAPE, GMICConfig
from .tissue import BitMask, largest_component

log = logging.getLogger(__name__)


def _scale(value: Any) -> float | str:
    if value == "fit" or (
        type(value) in (int, float) and math.isfinite(value) and 0.0 < value <= 1.0
    ):
        return value
    raise ValueError(f"must be in (0, 1] or 'fit', got {value!r}")


class PreprocessSpec(StrictConfig):
    subject: ClassVar[str] = "GMIC preprocessing"

    window: IntPair = PUBLISHED_INPUT_SHAPE
    """Model input size (rows, cols)."""
    scale: Annotated[float | Literal["fit"], PlainValidator(_scale)] = 1.0
    """Resize factor applied after the crop stage; the window is cut from the resized image.
    "fit" picks, per image, the largest factor ≤ 1 at which the tissue box fits the window:
    for models trained on images of varying size (the demo models)."""
    crop_iterations: Annotated[int, Field(ge=0)] = 100
    """Erosion/dilation iterations of the crop stage, in source pixels."""
    crop_buffer: Annotated[int, Field(ge=0)] = 50
    """Margin added around the tissue box (not on the chest-wall side), in source pixels."""
    rightmost_search_from: Annotated[float, Field(ge=0.0, lt=1.0)] = 1 / 3
    """Fraction of rows from the top ignored when looking for the right-most tissue column."""
    orientation: Literal["auto", "laterality"] = "auto"

    @field_validator("window")
    @classmethod
    def _positive(cls, window: tuple[int, int]) -> tuple[int, int]:
        if min(window) < 1:
            raise ValueError(f"must be (rows, cols), each at least 1, got {list(window)}")
        return window


def default_spec(architecture: dict[str, Any]) -> dict[str, Any]:
    """The published preprocessing, scaled to the architecture's input size.

    A smaller input keeps the published field of view: the cropped image is resized by
    input rows / 2944 before the window is cut.
    """
    rows, cols = GMICConfig.from_dict(architecture).input_shape
    return PreprocessSpec(window=(rows, cols), scale=rows / PUBLISHED_INPUT_SHAPE[0]).to_dict()


@dataclass(frozen=True)
class TissueBox:
    """The crop stage's result on the right-facing image."""

    top: int
    bottom: int
    left: int
    right: int
    rightmost_x: int
    """Right-most tissue column, relative to the box."""
    bottommost_y: int
    """Bottom-most tissue row, relative to the box."""


# -- public entry points ---------------------------------------------------------------------


def preprocess(
    image: Mammogram, spec: dict[str, Any] | PreprocessSpec, device: torch.device | str = "cpu"
) -> Prepared:
    """The model input, (1, rows, cols) float32 on `device`, and its `Geometry`. Every pixel
    operation runs in torch on `device`, except the crop stage's search on the CPU (numpy on
    bit-packed rows) and its labelling (of the eroded mask's row runs) everywhere."""
    window, geometry = window_tensor(image, spec, torch.device(device))
    return Prepared(tensor=standardise(window).unsqueeze(0), geometry=geometry)


def extract_window(
    image: Mammogram, spec: dict[str, Any] | PreprocessSpec
) -> tuple[np.ndarray, Geometry]:
    """The window before standardisation (float32, source intensities) and its geometry."""
    window, geometry = window_tensor(image, spec, torch.device("cpu"))
    return window.numpy(), geometry


def window_tensor(
    image: Mammogram, spec: dict[str, Any] | PreprocessSpec, device: torch.device
) -> tuple[torch.Tensor, Geometry]:
    """`extract_window` as a float32 tensor on `device`."""
    spec = spec if isinstance(spec, PreprocessSpec) else PreprocessSpec.from_dict(spec)
    source = np.asarray(image.pixels)
    if source.ndim != 2:
        raise MammogramError(f"GMIC needs a 2-D image, got pixel array shape {source.shape}")
    geometry = Geometry(image.shape)
    source = source.astype(np.float32, copy=False)
    flip = needs_flip(image, spec.orientation)
    if flip:  # a view: mirrored by the one copy that makes the tensor
        geometry, source = geometry.then(Flip(axis=1)), source[:, ::-1]
    if device.type == "cpu":  # the crop stage reads the view; only the crop is copied
        box = find_tissue(source, spec, flipped=flip)
        region = source[box.top : box.bottom, box.left : box.right]
        pixels = torch.from_numpy(region.copy() if min(region.strides) < 0 else region)
    else:
        pixels = torch.from_numpy(np.ascontiguousarray(source)).to(device)
        box = find_tissue(pixels, spec, flipped=flip)
        pixels = pixels[box.top : box.bottom, box.left : box.right]
    crop = Crop(box.top, box.left, box.bottom - box.top, box.right - box.left)
    if crop != Crop(0, 0, *source.shape):
        geometry = geometry.then(crop)
    rightmost_x, bottommost_y = box.rightmost_x, box.bottommost_y

    h, w = pixels.shape
    scale = min(1.0, spec.window[0] / h, spec.window[1] / w) if spec.scale == "fit" else spec.scale
    if scale != 1.0:
        resize = Resize(max(1, round(h * scale)), max(1, round(w * scale)))
        geometry, pixels = _step(geometry, pixels, resize)
        rightmost_x = int(np.floor((rightmost_x + 0.5) * resize.width / w))
        bottommost_y = int(np.floor((bottommost_y + 0.5) * resize.height / h))

    centre = window_centre(pixels, image.view, rightmost_x, bottommost_y, spec.window)
    pad, top, left = place_window(tuple(pixels.shape), image.view, centre, spec.window)
    for step in (pad, Crop(top, left, *spec.window)):
        geometry, pixels = _step(geometry, pixels, step)
    return pixels.contiguous(), geometry


def standardise(window: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation in float32, as GMIC does it (padding included)."""
    std, mean = torch.std_mean(window, correction=0)
    return (window - mean) / std.clamp_min(1e-5)


# -- the steps -------------------------------------------------------------------------------


def needs_flip(image: Mammogram, orientation: str) -> bool:
    """Whether the image must be mirrored so that the breast faces right (see module doc)."""
    if orientation == "laterality":
        return image.laterality == Laterality.RIGHT
    if image.patient_orientation:
        towards = image.patient_orientation[0].strip().upper()[:1]
        if towards in ("A", "P"):
            return towards == "P"
    pixels = image.pixels
    half = pixels.shape[1] // 2
    left = pixels[:, :half].sum(dtype=np.float64)
    right = pixels[:, pixels.shape[1] - half :].sum(dtype=np.float64)
    if left != right:
        flip = bool(right > left)
    else:
        flip = image.laterality == Laterality.RIGHT
    if flip != (image.laterality == Laterality.RIGHT):
        log.info(
            "%s image is not in the usual display orientation; mirrored=%s", image.view_key, flip
        )
    return flip


def find_tissue(
    pixels: torch.Tensor | np.ndarray, spec: PreprocessSpec, flipped: bool
) -> TissueBox:
    """GMIC's crop stage on a right-facing image.

    GMIC erodes `pixels > 0` `crop_iterations` times with the 4-neighbour cross (outside the
    image counts as background), keeps the largest 4-connected component and dilates it back
    as many times. r cross erosions keep exactly the pixels whose city-block distance to the
    nearest background pixel exceeds r, and r dilations reach exactly the pixels within
    city-block distance r of the component. So the erosion is one erosion by the L1 ball of
    radius r, on bit-packed rows on the CPU (`tissue`, a few milliseconds) and as a distance
    transform on an accelerator (`_city_block_distance`); the component comes from the
    eroded mask's row runs, and the dilation's bounding box and right-most columns follow
    from the component's per-row extent in closed form, instead of r passes over the image.

    `flipped` reproduces a detail of the public code: it measures the right-most column of a
    mirrored image from the far edge, one pixel further right than on the mirrored grid.
    """
    r = spec.crop_iterations
    if isinstance(pixels, torch.Tensor) and pixels.device.type != "cpu":
        mask = pixels > 0
        eroded = BitMask.pack((_city_block_distance(mask) > r if r else mask).cpu().numpy())
    else:
        eroded = BitMask.pack(np.asarray(pixels) > 0).erode_diamond(r)
    component, _ = largest_component(eroded)
    if component is None:
        raise MammogramError(
            "no breast tissue found: the image has no region of non-zero pixels wider than "
            f"{2 * r} pixels; check that the image is a mammogram whose background is 0"
        )
    height, width = pixels.shape

    top, bottom = max(component.top - r, 0), min(component.bottom + r, height)
    left, right = max(component.left - r, 0), min(component.right + r, width)
    bottommost = bottom - 1
    top -= min(top, spec.crop_buffer)
    bottom += min(height - bottom, spec.crop_buffer)
    right += min(width - right, spec.crop_buffer)

    # Right-most dilated column in rows [first, bottom): a component row y' reaches column
    # row_right[y'] + r - d out to the rows at distance d <= r from it.
    first = top + int((bottom - top) * spec.rightmost_search_from)
    ys = np.arange(component.top, component.bottom)
    distance = np.maximum(0, np.maximum(first - ys, ys - (bottom - 1)))
    near = distance <= r
    if near.any():
        reach = component.row_right[near] + r - distance[near]
        rightmost = int(min(reach.max(), width - 1)) - left
    else:  # a box so short that its tissue is all in the top part
        rightmost = min(component.right - 1 + r, width - 1) - left
    return TissueBox(top, bottom, left, right, rightmost + int(flipped), bottommost - top)


def _city_block_distance(mask: torch.Tensor) -> torch.Tensor:
    """Per pixel of a (rows, cols) boolean mask, the city-block (L1) distance to the nearest
    False pixel, counting everything outside the image as False; int32, 0 on False pixels.

    Separable and exact: first the distance along each row (from running maxima of the last
    background index to the left and right), then the lower envelope of cones down each
    column, min over y' of (g[y'] + |y - y'|), as two running minima.
    """
    rows, cols = mask.shape
    background = ~mask
    x = torch.arange(cols, device=mask.device, dtype=torch.int32).expand(rows, cols)
    last_left = torch.where(background, x, -1).cummax(dim=1).values
    last_right_flipped = torch.where(background.flip(1), x, -1).cummax(dim=1).values
    next_right = (cols - 1) - last_right_flipped.flip(1)
    g = torch.minimum(x - last_left, next_right - x)
    y = torch.arange(rows, device=mask.device, dtype=torch.int32)[:, None]
    down = (g - y).cummin(dim=0).values + y
    up = (g + y).flip(0).cummin(dim=0).values.flip(0) - y
    return torch.minimum(torch.minimum(down, up), torch.minimum(y + 1, rows - y))


def window_centre(
    pixels: torch.Tensor | np.ndarray,
    view: View,
    rightmost_x: int,
    bottommost_y: int,
    window: tuple[int, int],
) -> tuple[int, int]:
    """(row, col) centre of the window on the cropped, right-facing image."""
    pixels = torch.as_tensor(pixels)
    height, width = window
    centre_x = rightmost_x - width // 2 - 1
    if view == View.MLO:
        nonzero = torch.nonzero((pixels[:, -width:] != 0).any(dim=1)).flatten()
        if nonzero.numel():
            bottommost_y = min(int(nonzero[-1]), bottommost_y)
        return bottommost_y - height // 2 - 1, centre_x

    rows, cols = pixels.shape
    first, last = height // 2, rows - (height - height // 2)
    if first >= last:
        return rows // 2, centre_x
    candidates = np.arange(first, last + 1)
    counts = _window_counts(pixels > 0, candidates, centre_x, window)
    best = candidates[counts == counts.max()]
    return int(best[np.argmin(np.abs(best - rows // 2))]), centre_x


def place_window(
    shape: tuple[int, int], view: View, centre: tuple[int, int], window: tuple[int, int]
) -> tuple[Pad, int, int]:
    """Zero padding of the image and the window's upper-left corner in the padded image."""
    (rows, cols), (height, width) = shape, window
    top, left = centre[0] - height // 2, centre[1] - width // 2
    pad_top = pad_bottom = pad_right = 0
    if rows < height:
        top = 0
        if view == View.CC:
            pad_top = (height - rows) // 2
        pad_bottom = height - rows - pad_top
    if cols < width:
        left, pad_right = 0, width - cols
    top = min(max(top, 0), rows + pad_top + pad_bottom - height)
    left = min(max(left, 0), cols + pad_right - width)
    return Pad(top=pad_top, bottom=pad_bottom, right=pad_right), top, left


def _window_counts(
    mask: torch.Tensor, centres_y: np.ndarray, centre_x: int, window: tuple[int, int]
) -> np.ndarray:
    """Non-zero pixels in each window; windows that stick out are moved back inside first."""
    l0, l1 = _window_span(np.array([centre_x]), window[1], mask.shape[1])
    per_row = mask[:, int(l0[0]) : int(l1[0])].sum(dim=1).cpu().numpy()
    cumulative = np.concatenate([[0], np.cumsum(per_row)])
    t0, t1 = _window_span(centres_y, window[0], mask.shape[0])
    return cumulative[t1] - cumulative[t0]


def _window_span(centres: np.ndarray, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    start = centres - size // 2
    shift = np.clip(-start, 0, None)
    start = np.clip(start, 0, None)
    end = np.clip(centres + (size - size // 2) + shift, None, limit)
    return start, end


def _step(geometry: Geometry, pixels: torch.Tensor, step: Step) -> tuple[Geometry, torch.Tensor]:
    """Append `step` to the geometry and apply it to the pixels; identity steps are left out."""
    shape = tuple(pixels.shape)
    unchanged = step == Pad() or step == Crop(0, 0, *shape) or step == Resize(*shape)
    if unchanged:
        return geometry, pixels
    return geometry.then(step), _apply(step, pixels)


def _apply(step: Step, pixels: torch.Tensor) -> torch.Tensor:
    """Apply one geometry step to an image; outside the image reads as zero."""
    if isinstance(step, Pad):
        return F.pad(pixels, (step.left, step.right, step.top, step.bottom))
    if isinstance(step, Crop):
        r0, c0 = max(step.top, 0), max(step.left, 0)
        r1 = min(step.top + step.height, pixels.shape[0])
        c1 = min(step.left + step.width, pixels.shape[1])
        if (r1 - r0, c1 - c0) == (step.height, step.width):
            return pixels[r0:r1, c0:c1]  # inside the image: a view, no copy
        out = pixels.new_zeros((step.height, step.width))
        if r1 > r0 and c1 > c0:
            out[r0 - step.top : r1 - step.top, c0 - step.left : c1 - step.left] = pixels[
                r0:r1, c0:c1
            ]
        return out
    if isinstance(step, Resize):
        return F.interpolate(
            pixels[None, None],
            size=(step.height, step.width),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0, 0]
    raise TypeError(f"unknown geometry step {step!r}")
