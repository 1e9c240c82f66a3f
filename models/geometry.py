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
        else:
            m = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))
        resampler = self.resampler(m.shape[-2:], m.device)
        out = m.new_empty(*m.shape[:-2], *self.source_shape)
        resampler.rows_into(m, 0, self.source_shape[0], out)
        return out if isinstance(grid_map, torch.Tensor) else out.numpy()

    def resampler(self, map_shape: Sequence[int], device: torch.device) -> MapResampler:
        """Bilinear resampling of (…, h, w) maps onto the source grid, a strip of source rows
        at a time (`MapResampler.rows_into`): `map_to_source` in pieces that stay in cache."""
        h, w = (int(n) for n in map_shape)
        return MapResampler(
            _AxisWeights.of(*self._sample_axis(0, h), h, device),
            _AxisWeights.of(*self._sample_axis(1, w), w, device),
        )

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


@dataclass(frozen=True, eq=False)
class _AxisWeights:
    """Linear interpolation along one axis as an (n_source, n_map) weight matrix: at most two
    non-zero weights per source pixel ((1 - t) and t on the two cells around its centre), a
    zero row where the input does not show the pixel. So a product with it gives every pixel
    `(1 - t)·a + t·b`, as a gather would, at BLAS speed."""

    weights: torch.Tensor
    first: np.ndarray
    """Per source pixel, the first map cell it reads; `last`, the last."""
    last: np.ndarray

    @classmethod
    def of(
        cls,
        i0: np.ndarray,
        i1: np.ndarray,
        t: np.ndarray,
        inside: np.ndarray,
        n_map: int,
        device: torch.device,
    ) -> _AxisWeights:
        weights = np.zeros((i0.shape[0], n_map), np.float32)
        rows = np.arange(i0.shape[0])
        np.add.at(weights, (rows, i0), (np.float32(1) - t) * inside)
        np.add.at(weights, (rows, i1), t * inside)
        return cls(torch.from_numpy(weights).to(device), i0, i1)

    def cells(self, start: int, stop: int) -> tuple[int, int]:
        """The map cells [lo, hi) that source pixels [start, stop) read."""
        return int(self.first[start:stop].min()), int(self.last[start:stop].max()) + 1

    def blocks(self, cells_per_block: int) -> list[tuple[int, int, int, int]]:
        """(start, stop, lo, hi): source pixels in runs that each read about
        `cells_per_block` map cells, [lo, hi) of them."""
        n_src, n_map = self.weights.shape
        step = max(1, n_src * cells_per_block // n_map)
        return [(s, min(s + step, n_src), *self.cells(s, s + step)) for s in range(0, n_src, step)]


_CELLS_PER_BLOCK = 16
"""Map columns one product reads at most (about): products over the band of non-zero weights
only, so a 128-cell map costs as little per pixel as an 8-cell one."""


@dataclass(frozen=True, eq=False)
class MapResampler:
    """`Geometry.map_to_source` for one map shape, by strips of source rows.

    Rows first, then columns, each a product with the axis's weights restricted to the band
    of map cells the pixels read. The terms left out are exact zeros, so a pixel is the
    whole product's float up to how BLAS orders its two non-zero terms for the shape at
    hand (one fp32 rounding), and a map in [0, 1] stays in [0, 1]: the weights are >= 0 and
    fl(fl(1 - t) + t) <= 1, so no ordering of a·(1 - t) + b·t can leave it."""

    rows: _AxisWeights
    cols: _AxisWeights
    _col_blocks: list[tuple[int, int, int, int]] = field(init=False, repr=False)
    _cols_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_col_blocks", self.cols.blocks(_CELLS_PER_BLOCK))
        object.__setattr__(self, "_cols_t", self.cols.weights.T)

    def rows_into(self, m: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Source rows [start, stop) of the (…, h, w) fp32 map `m` on the source grid, written
        into `out` (…, stop - start, source columns); returns `out`. A strip costs in
        proportion to its rows, whatever the map's size: the products skip the band's zeros."""
        lo, hi = self.rows.cells(start, stop)
        x = torch.matmul(self.rows.weights[start:stop, lo:hi], m[..., lo:hi, :])
        blocks = self._col_blocks
        if len(blocks) == 1:
            _, _, c_lo, c_hi = blocks[0]
            return torch.matmul(x[..., c_lo:c_hi], self._cols_t[c_lo:c_hi], out=out)
        # Per map and block straight into `out`'s columns: BLAS writes a strided block.
        xs, outs = x.reshape(-1, *x.shape[-2:]), out.view(-1, *out.shape[-2:])
        for c0, c1, c_lo, c_hi in blocks:
            for x_c, out_c in zip(xs, outs, strict=True):
                torch.mm(x_c[:, c_lo:c_hi], self._cols_t[c_lo:c_hi, c0:c1], out=out_c[:, c0:c1])
        return out
