"""`Geometry`: the exact chain of flips, crops, pads and resizes from a source image to a
model input, and its inverse.

Every step is axis-aligned, so the chain is a separate affine map per axis in continuous pixel
coordinates (pixel i covers [i, i+1)). That makes mapping points, boxes and whole maps back to
the source grid exact and cheap, whatever the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Flip:
    """Mirror one axis (0 = rows, 1 = columns) of the current image."""

    axis: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"Flip axis must be 0 (rows) or 1 (columns), got {self.axis}")


@dataclass(frozen=True)
class Crop:
    """Keep rows [top, top+height) and columns [left, left+width); may extend past the image,
    in which case the outside reads as zero (a crop with negative offsets is a pad)."""

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"Crop must keep at least one pixel, got {self}")


@dataclass(frozen=True)
class Pad:
    """Add zero rows/columns on each side."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def __post_init__(self) -> None:
        if min(self.top, self.bottom, self.left, self.right) < 0:
            raise ValueError(f"Pad amounts must be >= 0 (use Crop to remove pixels), got {self}")


@dataclass(frozen=True)
class Resize:
    """Resample the whole current image to (height, width)."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"Resize needs a size of at least 1x1, got {self}")


Step = Flip | Crop | Pad | Resize


@dataclass(frozen=True)
class _Axis:
    """x_input = scale * x_source + offset, on one axis."""

    scale: float = 1.0
    offset: float = 0.0

    def then(self, scale: float, offset: float) -> _Axis:
        return _Axis(self.scale * scale, self.offset * scale + offset)


@dataclass(frozen=True)
class Geometry:
    """Source grid (rows, cols) → input grid, as an ordered chain of steps."""

    source_shape: tuple[int, int]
    steps: tuple[Step, ...] = ()
    _axes: tuple[_Axis, _Axis] = field(init=False, repr=False, compare=False)
    _input_shape: tuple[int, int] = field(init=False, repr=False, compare=False)
    _visible: tuple[tuple[float, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        axes = [_Axis(), _Axis()]
        size = [float(n) for n in self.source_shape]
        # Per axis, the interval of the current grid that still shows source pixels: a crop
        # followed by a pad must not make cropped-away source pixels look visible.
        visible = [[0.0, size[0]], [0.0, size[1]]]
        for step in self.steps:
            if isinstance(step, Flip):
                a = step.axis
                axes[a] = axes[a].then(-1.0, size[a])
                visible[a] = [size[a] - visible[a][1], size[a] - visible[a][0]]
            elif isinstance(step, Crop):
                for a, start, length in ((0, step.top, step.height), (1, step.left, step.width)):
                    axes[a] = axes[a].then(1.0, -float(start))
                    lo, hi = visible[a][0] - start, visible[a][1] - start
                    visible[a] = [max(lo, 0.0), min(hi, float(length))]
                    size[a] = float(length)
            elif isinstance(step, Pad):
                for a, before, after in ((0, step.top, step.bottom), (1, step.left, step.right)):
                    axes[a] = axes[a].then(1.0, float(before))
                    visible[a] = [visible[a][0] + before, visible[a][1] + before]
                    size[a] += before + after
            elif isinstance(step, Resize):
                for a, new in ((0, step.height), (1, step.width)):
                    k = new / size[a]
                    axes[a] = axes[a].then(k, 0.0)
                    visible[a] = [visible[a][0] * k, visible[a][1] * k]
                    size[a] = float(new)
            else:  # pragma: no cover - the type union is closed
                raise TypeError(f"unknown geometry step {step!r}")
        object.__setattr__(self, "_axes", (axes[0], axes[1]))
        object.__setattr__(self, "_input_shape", (int(size[0]), int(size[1])))
        object.__setattr__(self, "_visible", (tuple(visible[0]), tuple(visible[1])))

    def then(self, *steps: Step) -> Geometry:
        return Geometry(self.source_shape, self.steps + tuple(steps))

    @property
    def input_shape(self) -> tuple[int, int]:
        return self._input_shape

    def visible(self, points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Whether (…, 2) input coordinates show source pixels (not padding, not cropped)."""
        p = np.asarray(points, dtype=np.float64)
        ok = np.ones(p.shape[:-1], dtype=bool)
        for a in (0, 1):
            lo, hi = self._visible[a]
            ok &= (p[..., a] >= lo) & (p[..., a] < hi)
        return ok

    # -- points and boxes ---------------------------------------------------------------

    def to_input(self, points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """(…, 2) continuous (row, col) source coordinates → input coordinates."""
        p = np.asarray(points, dtype=np.float64)
        out = np.empty_like(p)
        for a in (0, 1):
            out[..., a] = self._axes[a].scale * p[..., a] + self._axes[a].offset
        return out

    def to_source(self, points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """(…, 2) continuous (row, col) input coordinates → source coordinates."""
        p = np.asarray(points, dtype=np.float64)
        out = np.empty_like(p)
        for a in (0, 1):
            out[..., a] = (p[..., a] - self._axes[a].offset) / self._axes[a].scale
        return out

    def box_to_source(self, box: Sequence[float], clip: bool = True) -> tuple[float, ...]:
        """(top, left, bottom, right) in input pixels → the same box on the source grid.

        Flips swap the edges, so the corners are re-sorted. `clip` first trims the box to the
        part of the input that shows source pixels (not padding, not source cropped away before
        a pad), so a box wholly outside it comes back empty (bottom <= top or right <= left).
        """
        top, left, bottom, right = (float(v) for v in box)
        if clip:
            (r0, r1), (c0, c1) = self._visible
            top, bottom = min(max(top, r0), r1), min(max(bottom, r0), r1)
            left, right = min(max(left, c0), c1), min(max(right, c0), c1)
        corners = self.to_source([[top, left], [bottom, right]])
        top, bottom = sorted(corners[:, 0])
        left, right = sorted(corners[:, 1])
        if clip:
            rows, cols = self.source_shape
            top, bottom = np.clip([top, bottom], 0, rows)
            left, right = np.clip([left, right], 0, cols)
        # `+ 0.0` turns a -0.0 from the flip arithmetic into 0.0.
        return (float(top) + 0.0, float(left) + 0.0, float(bottom) + 0.0, float(right) + 0.0)

    # -- maps -----------------------------------------------------------------------------

    def map_to_source(self, grid_map: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Resample a (…, h, w) map that covers the whole input grid onto the source grid.

        Bilinear on pixel centres; source pixels that fall outside the input (cropped away)
        read 0. Works for any map resolution: the saliency grid, or the input itself. A tensor
        is resampled on its own device and comes back as a float32 tensor there (so a GPU
        ensemble moves only the finished map); an array comes back as a float32 array.
        """
        if isinstance(grid_map, torch.Tensor):
            m = grid_map.float()
            return self._resample(self._resample(m, 0), 1)
        m = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))
        return self._resample(self._resample(m, 0), 1).numpy()

    def _resample(self, m: torch.Tensor, a: int) -> torch.Tensor:
        """Linear interpolation along axis `a` (0 rows, 1 columns) of a (…, h, w) map.

        A coarse map (a saliency grid) is resampled as one matrix product with the (source,
        map) interpolation weights: at most two non-zero per row, a zero row outside the input,
        so every output is `(1 - t)·a + t·b` exactly as a gather would give it, at BLAS speed.
        A fine map (the input itself) gathers the two neighbours instead.
        """
        dim = m.dim() - 2 + a
        n_map = m.shape[dim]
        i0, i1, t, inside = (torch.from_numpy(v).to(m.device) for v in self._sample_axis(a, n_map))
        if n_map <= _MATMUL_MAX_CELLS:
            weights = torch.zeros(i0.shape[0], n_map, dtype=m.dtype, device=m.device)
            rows = torch.arange(i0.shape[0], device=m.device)
            weights.index_put_((rows, i0), (1 - t) * inside, accumulate=True)
            weights.index_put_((rows, i1), t * inside, accumulate=True)
            return weights @ m if a == 0 else m @ weights.T
        shape = [1] * m.dim()
        shape[dim] = -1
        lo, hi = m.index_select(dim, i0), m.index_select(dim, i1)
        out = lo + (hi - lo) * t.view(shape)
        return torch.where(inside.view(shape), out, out.new_zeros(()))

    def area_to_input(self, source_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Area-average a (rows, cols) source-grid map onto an (h, w) grid covering the input.

        Each output cell holds the mean of the source over the cell's footprint, with source
        pixels the input does not show (padding, cropped away) counting as 0. This is how a
        lesion mask becomes the per-cell "fraction of lesion" a coarse model map is trained
        against: a 0.2 mm calcification survives as a small fraction, where point sampling
        would miss it.
        """
        m = np.asarray(source_map, dtype=np.float32)
        if m.shape != tuple(self.source_shape):
            raise ValueError(f"map is {m.shape}, the source grid is {tuple(self.source_shape)}")
        rows = self._area_weights(0, shape[0])
        cols = self._area_weights(1, shape[1])
        return (rows @ m @ cols.T).astype(np.float32)

    def _area_weights(self, a: int, n_out: int) -> np.ndarray:
        """(n_out, n_source) weights: overlap of each source pixel with each output cell's
        footprint on the source axis, divided by the footprint's length."""
        n_src, n_in = self.source_shape[a], self._input_shape[a]
        lo, hi = self._visible[a]
        edges_in = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
        cell_lo, cell_hi = np.clip(edges_in[:-1], lo, hi), np.clip(edges_in[1:], lo, hi)
        axis = self._axes[a]
        src_a, src_b = (cell_lo - axis.offset) / axis.scale, (cell_hi - axis.offset) / axis.scale
        src_lo, src_hi = np.minimum(src_a, src_b)[:, None], np.maximum(src_a, src_b)[:, None]
        pixel = np.arange(n_src, dtype=np.float64)[None, :]
        overlap = np.clip(np.minimum(src_hi, pixel + 1) - np.maximum(src_lo, pixel), 0.0, None)
        footprint = (edges_in[1:] - edges_in[:-1])[:, None] / abs(axis.scale)
        return (overlap / footprint).astype(np.float32)

    def _sample_axis(
        self, a: int, n_map: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per source pixel on axis `a`: the two map cells around its centre, the weight of the
        second, and whether the input shows it at all."""
        n_src = self.source_shape[a]
        centres = np.arange(n_src, dtype=np.float64) + 0.5
        x_in = self._axes[a].scale * centres + self._axes[a].offset
        u = x_in * (n_map / self._input_shape[a]) - 0.5
        lo, hi = self._visible[a]
        inside = (x_in >= lo) & (x_in < hi)
        u = np.clip(u, 0, n_map - 1)
        i0 = np.floor(u).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_map - 1)
        t = (u - i0).astype(np.float32)
        return i0, i1, t, inside


_MATMUL_MAX_CELLS = 512
"""Up to this many map cells on an axis, resampling is a matrix product (see `_resample`)."""
