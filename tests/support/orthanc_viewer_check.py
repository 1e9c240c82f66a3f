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
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WINDOW = (1400, 1100)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
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
    messages: list[str] = field(default_factory=list)  # every console message

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
            out.messages.append(f"{message.type}: {message.text}")
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


_PANES_JS = """() => [...document.querySelectorAll('[data-cy=viewport-pane]')].map(pane => {
  const rect = e => { const r = e.getBoundingClientRect();
                      return {x: r.x, y: r.y, width: r.width, height: r.height}; };
  const canvas = pane.querySelector('canvas.cornerstone-canvas');
  const svg = pane.querySelector('svg.svg-layer');
  const top = pane.querySelector('[data-cy=viewport-overlay-top-left]');
  return {
    label: top ? top.innerText.trim().split('\\n').pop().trim() : '',
    canvas: canvas ? rect(canvas) : null,
    svg: svg ? rect(svg) : null,
    boxes: svg ? [...svg.querySelectorAll('polyline')].map(p => p.getAttribute('points')) : [],
    text: pane.innerText,
  };
})"""


@dataclass
class OhifPane:
    """One OHIF viewport: the series description OHIF shows top left, where its canvas is,
    and the SR outlines drawn on it (screen coordinates)."""

    label: str
    canvas: dict
    boxes: list[np.ndarray]
    text: str

    def at_source(self, rows: int, cols: int, x: float, y: float) -> tuple[int, int]:
        """Screen (column, row) of source pixel (x, y) of a rows x cols image, which OHIF
        fits into the viewport (aspect kept, centred), unless zoomed or panned."""
        c = self.canvas
        scale = min(c["width"] / cols, c["height"] / rows)
        x0 = c["x"] + (c["width"] - cols * scale) / 2
        y0 = c["y"] + (c["height"] - rows * scale) / 2
        return int(x0 + x * scale), int(y0 + y * scale)

    def crop(self, shot: np.ndarray) -> np.ndarray:
        c = self.canvas
        return shot[int(c["y"]) : int(c["y"] + c["height"]), int(c["x"]) : int(c["x"] + c["width"])]


@dataclass
class OhifViewer(Page):
    """OHIF 3.13 (orthanc/ohif/dist behind serve_ohif.py)."""

    def panes(self) -> list[OhifPane]:
        out = []
        for pane in self.page.evaluate(_PANES_JS):
            if pane["canvas"] is None:
                continue
            origin = pane["svg"] or pane["canvas"]
            boxes = [
                np.array(re.findall(r"-?[\d.]+", points), dtype=float).reshape(-1, 2)
                + [origin["x"], origin["y"]]
                for points in pane["boxes"]
                if points.strip()
            ]
            out.append(OhifPane(pane["label"], pane["canvas"], boxes, pane["text"]))
        return out

    def pane(self, label: str) -> OhifPane:
        found = [p for p in self.panes() if p.label == label]
        assert len(found) == 1, (label, [p.label for p in self.panes()])
        return found[0]

    def activate(self, index: int) -> None:
        """Click into the index-th pane: series opened next go there."""
        c = self.panes()[index].canvas
        self.page.mouse.click(c["x"] + c["width"] / 2, c["y"] + c["height"] / 2)

    def open_series(self, description: str) -> None:
        """Double-click the study browser's thumbnail of a series: it opens in the active
        viewport."""
        thumbnail = self.page.locator("[data-cy^=study-browser-thumbnail]", has_text=description)
        thumbnail.first.scroll_into_view_if_needed()
        thumbnail.first.dblclick()

    def answer(self, button: str) -> None:
        """Answer OHIF's prompt in the viewport (track the SR's measurements? open the SEG?)."""
        self.page.get_by_role("button", name=button, exact=True).first.click(timeout=60_000)

    def wait_for_sr(self, timeout: float) -> OhifPane:
        """The pane that shows an SR's outline and "Probability of cancer"."""

        def shown():
            panes = [p for p in self.panes() if p.boxes and "Probability of cancer" in p.text]
            return panes[0] if panes else None

        return wait_for(shown, timeout, "the TID 1500 SR drawn in OHIF", self)

    def errors_except(self, *expected: str) -> list[str]:
        """Errors, less OHIF cancelling its own prefetches (a switched series) and `expected`."""
        return [
            e
            for e in self.errors
            if not (e.startswith("request failed:") and "net::ERR_ABORTED" in e)
            and not any(x in e for x in expected)
        ]


def wait_for(condition, timeout: float, what: str, page: Page, interval: float = 0.5):
    """Poll `condition` up to `timeout` seconds: its value once neither None nor False."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            page.screenshot("wait-timed-out")
            raise AssertionError(f"{what}: not seen within {timeout:.0f} s; errors: {page.errors}")
        page.page.wait_for_timeout(interval * 1000)


def pixel(shot: np.ndarray, at: tuple[int, int]) -> tuple[int, int, int]:
    r, g, b = shot[at[1], at[0]]
    return int(r), int(g), int(b)


def saturation(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1]
