"""The crop stage's morphology on a bit-packed mask: erosion by an L1 ball and the largest
4-connected component, exact and in a few milliseconds for a 3328x2560 image on one core.

Each mask row is packed into 64-bit words (bit i of word w is column 64w + i), so a shift
or an AND touches 64 pixels per operation. Erosion by the L1 ball of radius r (what r
erosions by the 4-neighbour cross compute) goes through its decomposition into two
diagonal segments and one or two crosses: the segments' sum holds exactly the points of
even parity, and a cross adds the odd ones. A segment of length n costs log2(n) shifts
(a run of 2m offsets is a run of m ANDed with itself moved by m). Everything outside the
image reads as background, as in GMIC's erosion.

The component search works on the rows' runs of set bits, as scipy's labelling does
internally: two runs in adjacent rows touch when their column ranges overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

_WORD = 64
_WORD_DTYPE = np.dtype("<u8")


@dataclass(frozen=True)
class BitMask:
    """A (rows, cols) boolean mask packed row by row into little-endian 64-bit words."""

    words: np.ndarray
    """(rows, ceil(cols / 64)) `<u8`; the bits beyond `cols` in the last word are zero."""
    cols: int

    @classmethod
    def pack(cls, mask: np.ndarray) -> BitMask:
        rows, cols = mask.shape
        padded = -(-cols // _WORD) * (_WORD // 8)
        packed = np.zeros((rows, padded), np.uint8)
        packed[:, : -(-cols // 8)] = np.packbits(mask, axis=1, bitorder="little")
        return cls(packed.view(_WORD_DTYPE), cols)

    def unpack(self) -> np.ndarray:
        bits = np.unpackbits(self.words.view(np.uint8), axis=1, bitorder="little")
        return bits[:, : self.cols].astype(bool)

    def shifted(self, dy: int, dx: int) -> np.ndarray:
        """Words of the mask read at (y + dy, x + dx) for each (y, x); outside reads 0.
        The rows in range shift as one flat run of words (contiguous: 2x faster than row by
        row); the words that read across a row's end are then redone."""
        words = self.words
        rows, width = words.shape
        out = np.empty_like(words)
        if abs(dy) >= rows or abs(dx) >= self.cols:
            out[:] = 0
            return out
        out[: max(-dy, 0)] = 0
        out[rows - max(dy, 0) :] = 0
        src = words[max(dy, 0) : rows + min(dy, 0)]
        dst = out[max(-dy, 0) : rows + min(-dy, 0)]
        flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
        q, b = divmod(abs(dx), _WORD)
        n = flat_src.size - q
        if dx >= 0:  # bits move towards lower columns
            np.right_shift(flat_src[q:], b, out=flat_dst[:n])
            if b:
                flat_dst[: n - 1] |= flat_src[q + 1 :] << (_WORD - b)
                dst[:, width - q - 1] = src[:, width - 1] >> b
            dst[:, width - q :] = 0
        else:
            np.left_shift(flat_src[:n], b, out=flat_dst[q:])
            if b:
                flat_dst[q + 1 :] |= flat_src[: n - 1] >> (_WORD - b)
                dst[:, q] = src[:, 0] << b
            dst[:, :q] = 0
            if self.cols % _WORD:  # columns beyond the image took bits: clear them
                dst[:, -1] &= np.uint64((1 << (self.cols % _WORD)) - 1)
        return out

    def _with(self, words: np.ndarray) -> BitMask:
        return BitMask(words, self.cols)

    def erode_cross(self) -> BitMask:
        words = self.words.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            words &= self.shifted(dy, dx)
        return self._with(words)

    def erode_segment(self, a: int, dx: int) -> BitMask:
        """Erosion by the 2a + 1 points (t, t * dx), |t| <= a: a diagonal segment."""
        if a == 0:
            return self
        length, run, covered = 2 * a + 1, self, 1  # `run` holds offsets 0 .. covered - 1
        while 2 * covered <= length:
            run = run._with(run.words & run.shifted(covered, covered * dx))
            covered *= 2
        rest = length - covered  # the two runs starting at -a and at rest - a cover -a .. a
        return self._with(run.shifted(-a, -a * dx) & run.shifted(rest - a, (rest - a) * dx))

    def erode_diamond(self, r: int) -> BitMask:
        """Erosion by the L1 ball of radius r: `r` erosions by the 4-neighbour cross."""
        if r == 0:
            return self
        a, odd = divmod(r, 2)
        half = a if odd else a - 1  # r = 2 * half + 1 (+ 1 more cross when r is even)
        eroded = self.erode_segment(half, 1).erode_segment(half, -1).erode_cross()
        return eroded if odd else eroded.erode_cross()

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, first column, last column) of every run of set bits, in raster order."""
        starts = self.words & ~self.shifted(0, -1)
        ends = self.words & ~self.shifted(0, 1)
        row, first = _set_bits(starts)
        _, last = _set_bits(ends)
        return row, first, last


def _set_bits(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every set bit, in raster order."""
    flat = words.ravel()
    nonzero = np.flatnonzero(flat != 0)  # numpy's fast path is on booleans: 5-8x faster
    unpacked = np.unpackbits(flat[nonzero].view(np.uint8), bitorder="little")
    bits = np.flatnonzero(unpacked.view(bool))
    index = nonzero[bits // _WORD]
    return index // words.shape[1], (index % words.shape[1]) * _WORD + bits % _WORD


@dataclass(frozen=True)
class Component:
    """One 4-connected component of a mask: its bounding box (end-exclusive) and, per row
    of the box, its right-most column (a 4-connected component has no empty row inside)."""

    top: int
    bottom: int
    left: int
    right: int
    row_right: np.ndarray


def largest_component(mask: BitMask) -> tuple[Component | None, int]:
    """The largest 4-connected component of `mask` and the number of components. Of equal
    sizes, the one whose first pixel comes first in raster order wins, as with the first
    maximum of scipy's `ndimage.label` counts."""
    row, first, last = mask.runs()
    if not len(row):
        return None, 0
    # Run j touches the runs of the row above whose last column >= first[j] and whose first
    # column <= last[j]: a contiguous index range, found by key = row * cols + column.
    cols = mask.cols
    start_key, end_key = row * cols + first, row * cols + last
    above = (row - 1) * cols
    lo = np.searchsorted(end_key, above + first, side="left")
    hi = np.searchsorted(start_key, above + last, side="right")
    touching = np.maximum(hi - lo, 0)
    j = np.repeat(np.arange(len(row)), touching)
    i = lo[j] + np.arange(len(j)) - np.repeat(np.cumsum(touching) - touching, touching)
    graph = coo_array((np.ones(len(j), np.int8), (i, j)), shape=(len(row), len(row)))
    count, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels, weights=last - first + 1, minlength=count)
    _, first_run = np.unique(labels, return_index=True)
    biggest = np.flatnonzero(sizes == sizes.max())
    chosen = biggest[np.argmin(first_run[biggest])]
    mine = labels == chosen
    rows, lasts = row[mine], last[mine]
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    row_right = np.full(bottom - top, -1, np.int64)
    np.maximum.at(row_right, rows - top, lasts)
    left, right = int(first[mine].min()), int(lasts.max()) + 1
    return Component(top, bottom, left, right, row_right), count
