"""Checks of the overlay viewer page in headless Chromium, shared by the Orthanc tests.

The page records, per view, where source pixel (0, 0) lands on screen (`data-screen` on each
figure), so a test can map a point of the source image (the lesion) onto the screenshot.
"""

from __future__ import annotations

import colorsys
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WINDOW = (1400, 1100)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not found; install it with `apt-get install chromium`")
    return found


def _run_chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        *mode,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@dataclass(frozen=True)
class ViewerCapture:
    dom: str
    screenshot: Path

    def figure(self, key: str) -> str:
        match = re.search(rf'<figure class="view"[^>]*data-view="{key}"[^>]*>', self.dom)
        assert match, f"no figure for {key} in the page"
        return match.group(0)

    def screen_geometry(self, key: str) -> dict:
        match = re.search(r'data-screen="([^"]*)"', self.figure(key))
        assert match, f"{key} was not drawn"
        return json.loads(match.group(1).replace("&quot;", '"'))

    def score(self, element_id: str) -> float | None:
        match = re.search(rf'id="{element_id}"[^>]*data-value="([^"]*)"', self.dom)
        assert match, f"no #{element_id} in the page"
        return float(match.group(1)) if match.group(1) else None

    def status(self) -> str:
        match = re.search(r'id="status" data-state="([a-z]+)"', self.dom)
        return match.group(1) if match else "?"

    def pixel_at_source(self, key: str, x: float, y: float) -> tuple[int, int, int]:
        """The screenshot's colour at source pixel (x, y) of view `key`."""
        g = self.screen_geometry(key)
        sx = (g["w"] - x) if g["flip_h"] else x
        sy = (g["h"] - y) if g["flip_v"] else y
        px, py = g["x0"] + sx * g["scale"], g["y0"] + sy * g["scale"]
        image = np.asarray(Image.open(self.screenshot).convert("RGB"))
        r, gg, b = image[int(round(py)), int(round(px))]
        return int(r), int(gg), int(b)


def capture(url: str, workdir: Path, name: str) -> ViewerCapture:
    """Load the page twice (DOM dump, then screenshot) in fresh headless Chromium profiles."""
    ARTIFACTS.mkdir(exist_ok=True)
    url += f"{'&' if '?' in url else '?'}layout={WINDOW[0]}x{WINDOW[1]}"
    shot = ARTIFACTS / f"{name}.png"
    dom = _run_chromium(url, workdir / "chromium-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    png = _run_chromium(url, workdir / "chromium-shot", f"--screenshot={shot}")
    assert png.returncode == 0 and shot.exists(), png.stderr[-2000:]
    return ViewerCapture(dom.stdout, shot)


def saturation(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1]
