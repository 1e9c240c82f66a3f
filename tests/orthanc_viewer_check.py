"""Debian's Chromium driven by Playwright (the pip package, pointed at /usr/bin/chromium: no
browser is downloaded), shared by the viewer tests (Orthanc overlay viewer, OHIF).

The overlay page records, per view, where source pixel (0, 0) lands on screen (`data-screen` on
each figure), so a test can map a point of the source image (the lesion) onto the screenshot.
Every page collects its console errors, uncaught exceptions and failed requests.
"""

from __future__ import annotations

import colorsys
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WINDOW = (1400, 1100)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# WebGL (OHIF's Cornerstone) on a machine without a GPU: SwiftShader.
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not found; install it with `apt-get install chromium`")
    return found


@contextmanager
def browser() -> Iterator:
    """A headless Debian Chromium under Playwright."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install -e '.[test]' installs playwright"
    )
    executable = chromium()
    with sync_api.sync_playwright() as driver:
        instance = driver.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            instance.close()


@dataclass
class Page:
    """One page in its own browser context, with what went wrong in it."""

    page: object
    errors: list[str] = field(default_factory=list)

    @classmethod
    @contextmanager
    def open(
        cls,
        browser,
        url: str,
        *,
        credentials: tuple[str, str] | None = None,
        window: tuple[int, int] = WINDOW,
        ignore: tuple[str, ...] = (),
    ) -> Iterator[Page]:
        """`credentials`: what the browser authenticates with when Orthanc asks (an Orthanc
        session); the URL itself may carry them instead (kiosk). Console messages containing
        one of `ignore` are not errors."""
        context = browser.new_context(
            viewport={"width": window[0], "height": window[1]},
            http_credentials=(
                {"username": credentials[0], "password": credentials[1]} if credentials else None
            ),
        )
        page = context.new_page()
        out = cls(page)

        def console(message) -> None:
            if message.type == "error" and not any(s in message.text for s in ignore):
                out.errors.append(f"console: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: out.errors.append(f"uncaught: {error}"))
        page.on(
            "requestfailed",
            lambda request: out.errors.append(f"request failed: {request.url} {request.failure}"),
        )
        try:
            page.goto(url, wait_until="load", timeout=60_000)
            yield out
        finally:
            context.close()

    def screenshot(self, name: str) -> np.ndarray:
        """The viewport as RGB, also saved to tests/artifacts/{name}.png."""
        ARTIFACTS.mkdir(exist_ok=True)
        png = self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@dataclass
class OverlayViewer(Page):
    """The Orthanc overlay viewer (orthanc/viewer/)."""

    def wait_ready(self) -> str:
        self.page.wait_for_function(
            "document.getElementById('status').dataset.state !== 'loading'", timeout=60_000
        )
        return self.status()

    def status(self) -> str:
        return self.page.get_attribute("#status", "data-state")

    def score(self, element_id: str) -> float | None:
        value = self.page.get_attribute(f"#{element_id}", "data-value")
        return float(value) if value else None

    def geometry(self, key: str) -> dict:
        screen = self.page.get_attribute(f'figure[data-view="{key}"]', "data-screen")
        assert screen, f"{key} was not drawn"
        return json.loads(screen)

    def box(self, selector: str) -> dict:
        found = self.page.locator(selector)
        assert found.count() == 1, selector
        return found.bounding_box()

    def at_source(self, key: str, x: float, y: float) -> tuple[int, int]:
        """Screen (column, row) of source pixel (x, y) of view `key`."""
        g = self.geometry(key)
        sx = (g["w"] - x) if g["flip_h"] else x
        sy = (g["h"] - y) if g["flip_v"] else y
        return int(g["x0"] + sx * g["scale"]), int(g["y0"] + sy * g["scale"])

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)


def pixel(shot: np.ndarray, at: tuple[int, int]) -> tuple[int, int, int]:
    r, g, b = shot[at[1], at[0]]
    return int(r), int(g), int(b)


def saturation(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1]
