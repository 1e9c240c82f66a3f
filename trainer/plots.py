"""ROC and calibration plots drawn with Pillow (matplotlib is not a dependency).

A plot is a unit square of data in a fixed frame with ticks at 0, 0.2, … 1, the chance/ideal
diagonal, and a legend; enough to read an evaluation, not a plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .metrics import CalibrationBin

SIZE = 640
MARGIN = 70
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


class _Frame:
    def __init__(self, title: str, xlabel: str, ylabel: str) -> None:
        self.image = Image.new("RGB", (SIZE, SIZE), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.side = SIZE - 2 * MARGIN
        d = self.draw
        d.rectangle([MARGIN, MARGIN, MARGIN + self.side, MARGIN + self.side], outline="black")
        for t in np.linspace(0, 1, 6):
            x, y = self.xy(t, 0)
            d.line([x, y, x, y + 5], fill="black")
            d.text((x - 8, y + 8), f"{t:.1f}", fill="black", font=self.font)
            x, y = self.xy(0, t)
            d.line([x - 5, y, x, y], fill="black")
            d.text((x - 30, y - 6), f"{t:.1f}", fill="black", font=self.font)
        d.text((MARGIN, MARGIN - 30), title, fill="black", font=self.font)
        d.text(
            (MARGIN + self.side // 2 - 40, SIZE - MARGIN + 30), xlabel, fill="black", font=self.font
        )
        d.text((8, MARGIN - 18), ylabel, fill="black", font=self.font)
        d.line([self.xy(0, 0), self.xy(1, 1)], fill=(160, 160, 160), width=1)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return (MARGIN + x * self.side, MARGIN + (1 - y) * self.side)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        for i, (label, colour) in enumerate(entries):
            x, y = MARGIN + self.side - 190, MARGIN + self.side - 20 - 16 * (len(entries) - i)
            self.draw.line([x, y + 6, x + 20, y + 6], fill=colour, width=3)
            self.draw.text((x + 26, y), label, fill="black", font=self.font)

    def save(self, path: Path) -> Path:
        self.image.save(path, format="PNG")
        return path


def roc_png(
    path: Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    point: tuple[float, float, str] | None = None,
) -> Path:
    """One ROC curve per entry: label → (fpr, tpr). `band` (fpr grid, lower tpr, upper tpr)
    shades the first curve's 95% bootstrap band; `point` (fpr, tpr, label) marks the operating
    point."""
    frame = _Frame(f"ROC - {title}", "1 - specificity", "sensitivity")
    legend = []
    if band is not None:
        grid, lo, hi = band
        shade = tuple(int(255 - 0.25 * (255 - c)) for c in COLOURS[0])
        outline = [frame.xy(float(x), float(y)) for x, y in zip(grid, hi, strict=True)]
        outline += [frame.xy(float(x), float(y)) for x, y in zip(grid[::-1], lo[::-1], strict=True)]
        frame.draw.polygon(outline, fill=shade)
        frame.draw.line([frame.xy(0, 0), frame.xy(1, 1)], fill=(160, 160, 160), width=1)
        legend.append(("95% CI band (bootstrap)", shade))
    for (label, (fpr, tpr)), colour in zip(curves.items(), COLOURS, strict=False):
        points = [frame.xy(float(x), float(y)) for x, y in zip(fpr, tpr, strict=True)]
        frame.draw.line(points, fill=colour, width=2)
        legend.insert(len(legend) - (band is not None), (label, colour))
    if point is not None:
        x, y = frame.xy(point[0], point[1])
        frame.draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline="black", width=2)
        legend.append((point[2], (0, 0, 0)))
    frame.legend(legend)
    return frame.save(path)


def calibration_png(path: Path, bins: Sequence[CalibrationBin], title: str) -> Path:
    """Observed malignancy rate against mean predicted score per bin; dot area ∝ count."""
    frame = _Frame(f"Calibration - {title}", "mean predicted probability", "observed rate")
    colour = COLOURS[0]
    total = max(sum(b.count for b in bins), 1)
    points = [frame.xy(b.mean_score, b.observed) for b in bins]
    if len(points) > 1:
        frame.draw.line(points, fill=colour, width=2)
    for b, (x, y) in zip(bins, points, strict=True):
        r = 3 + 12 * (b.count / total) ** 0.5
        frame.draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
    frame.legend([("observed (dot area ~ cases)", colour), ("ideal", (160, 160, 160))])
    return frame.save(path)
