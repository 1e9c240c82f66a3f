// Mammo AI overlay viewer: four views in the standard hanging order with the saliency heat-map
// of our fractional SEG, the regions and scores of our SRs. Everything comes from this Orthanc
// (same origin): the summary from the plugin, image PNGs from Orthanc's own decoders.
//
// The heat-map follows plugin/outputs/heatmap.py (the SC heat-map's rule): transparent below
// the display threshold (the models' operating point, written into the SEG, else 0.2),
// viridis by absolute value above it, opacity from 0.35 at the threshold to 0.75 at 1.
"use strict";

const VIRIDIS = [
  [68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140],
  [40, 174, 128], [94, 201, 98], [173, 220, 48], [253, 231, 37],
];
const DISPLAY_FLOOR = 0.2;
const ALPHA_LOW = 0.35, ALPHA_HIGH = 0.75;
const OUTLINE = "#ff4040";  // a hue viridis never takes
const BREAST_LEVEL = 12;    // preview levels above this count as breast
const GAP = 4;              // CSS pixels between cells
const ARRANGEMENTS = {
  // Standard hanging: CCs above MLOs, right views left of the centre line.
  grid: { cols: 2, rows: 2, cell: { "R-CC": [0, 0], "L-CC": [1, 0], "R-MLO": [0, 1], "L-MLO": [1, 1] } },
  row: { cols: 4, rows: 1, cell: { "R-CC": [0, 0], "L-CC": [1, 0], "R-MLO": [2, 0], "L-MLO": [3, 0] } },
};

// URLs are built on location.origin, never on the page's own URL: a page opened as
// http://user:password@host/… must not put those credentials into its requests (fetch refuses
// such URLs); the browser sends the credentials it authenticated the page with.
const MARKER = "/mammo-ai/studies/";
const pagePath = location.pathname;
const orthancRoot = location.origin + pagePath.slice(0, pagePath.indexOf(MARKER));
const studyId = pagePath.slice(pagePath.indexOf(MARKER) + MARKER.length).replace(/\/+$/, "");

const shown = [];  // {view, fig, w, h, parts} of every drawn view, for layout and geometry

function firstShownLevel(threshold) {
  return Math.ceil(threshold * 255 - 1e-6);
}

function viridis(p) {
  const at = Math.min(1, Math.max(0, p)) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(at), VIRIDIS.length - 2), f = at - i;
  return [0, 1, 2].map((k) => VIRIDIS[i][k] + f * (VIRIDIS[i + 1][k] - VIRIDIS[i][k]));
}

// RGBA per 8-bit map level.
function buildLut(threshold) {
  const first = firstShownLevel(threshold);
  const span = Math.max(1 - first / 255, 1e-6);
  const lut = new Uint8ClampedArray(256 * 4);
  for (let v = 0; v < 256; v++) {
    const p = v / 255;
    const [r, g, b] = viridis(p);
    const ramp = Math.min(1, Math.max(0, (p - first / 255) / span));
    const alpha = v < first ? 0 : ALPHA_LOW + (ALPHA_HIGH - ALPHA_LOW) * ramp;
    lut.set([Math.round(r), Math.round(g), Math.round(b), Math.round(alpha * 255)], v * 4);
  }
  return lut;
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} %`;
}

function setScore(id, value) {
  const el = document.getElementById(id);
  el.textContent = percent(value);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${url.replace(location.origin, "")}`));
    img.src = url;
  });
}

function canvas(w, h, cls) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  c.className = cls;
  return c;
}

// Draw in source pixel coordinates; the transform mirrors the view into hanging orientation.
function orient(ctx, view, w, h) {
  ctx.setTransform(view.flip_h ? -1 : 1, 0, 0, view.flip_v ? -1 : 1,
                   view.flip_h ? w : 0, view.flip_v ? h : 0);
}

function greyscale(img, w, h) {
  const c = canvas(w, h, "");
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, w, h).data;
}

// Without PatientOrientation: the chest wall is the brighter edge; put it toward the centre.
function guessFlip(grey, w, h, side) {
  let left = 0, right = 0;
  const band = Math.max(1, Math.floor(w / 4));
  for (let y = 0; y < h; y += 4) {
    for (let x = 0; x < band; x += 4) left += grey[(y * w + x) * 4];
    for (let x = w - band; x < w; x += 4) right += grey[(y * w + x) * 4];
  }
  const chestWallRight = right > left;
  return side === "R" ? !chestWallRight : chestWallRight;
}

async function drawHeatmap(view, w, h, target, lut) {
  const img = await loadImage(
    `${orthancRoot}/instances/${view.heatmap.instance}/frames/${view.heatmap.frame}/image-uint8`);
  const tmp = canvas(w, h, "");
  const tctx = tmp.getContext("2d", { willReadFrequently: true });
  tctx.drawImage(img, 0, 0);
  const pixels = tctx.getImageData(0, 0, w, h);
  const d = pixels.data;
  const scale = 255 / (view.heatmap.max_value || 255);
  for (let i = 0; i < d.length; i += 4) {
    const v = Math.min(255, Math.round(d[i] * scale)) * 4;
    d[i] = lut[v]; d[i + 1] = lut[v + 1]; d[i + 2] = lut[v + 2]; d[i + 3] = lut[v + 3];
  }
  tctx.putImageData(pixels, 0, 0);
  const ctx = target.getContext("2d");
  orient(ctx, view, w, h);
  ctx.drawImage(tmp, 0, 0);
}

function bounds(outline) {
  const xs = outline.map((p) => p[0]), ys = outline.map((p) => p[1]);
  return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
}

// As on the SC heat-map: a region as large as the image (nothing localised) is not framed,
// nor one of which less than a fifth shows breast.
function worthOutlining(outline, grey, w, h) {
  const [x0, y0, x1, y1] = bounds(outline).map(Math.round);
  if ((x1 - x0) * (y1 - y0) > 0.9 * w * h) return false;
  let breast = 0, all = 0;
  const step = Math.max(1, Math.floor(Math.max(x1 - x0, y1 - y0) / 64));
  for (let y = Math.max(0, y0); y < Math.min(h, y1); y += step) {
    for (let x = Math.max(0, x0); x < Math.min(w, x1); x += step) {
      all++;
      if (grey[(y * w + x) * 4] > BREAST_LEVEL) breast++;
    }
  }
  return all > 0 && breast / all >= 0.2;
}

function drawOutline(view, w, h, target) {
  const ctx = target.getContext("2d");
  orient(ctx, view, w, h);
  ctx.strokeStyle = OUTLINE;
  ctx.lineWidth = Math.max(2, Math.min(w, h) / 250);
  ctx.beginPath();
  view.outline.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.closePath();
  ctx.stroke();
}

function caption(view) {
  const el = document.createElement("figcaption");
  el.innerHTML = `${view.key.replace("-", " ")} · image <b class="score-image" ` +
    `id="score-image-${view.key}" data-value="${view.malignant ?? ""}">` +
    `${percent(view.malignant)}</b>` +
    (view.benign !== null ? ` · benign ${percent(view.benign)}` : "");
  return el;
}

async function showView(view, fig, lut) {
  const img = await loadImage(`${orthancRoot}/instances/${view.instance}/preview`);
  const w = img.naturalWidth, h = img.naturalHeight;
  const grey = greyscale(img, w, h);
  if (!view.orientation_known) view.flip_h = guessFlip(grey, w, h, view.key[0]);
  const base = canvas(w, h, "base");
  const heat = canvas(w, h, "heatmap");
  const lines = canvas(w, h, "outline");
  const label = caption(view);
  fig.append(base, heat, lines, label);
  const bctx = base.getContext("2d");
  orient(bctx, view, w, h);
  bctx.drawImage(img, 0, 0);
  if (view.heatmap) await drawHeatmap(view, w, h, heat, lut);
  if (view.outline && worthOutlining(view.outline, grey, w, h)) drawOutline(view, w, h, lines);
  fig.dataset.heatmap = view.heatmap ? "yes" : "no";
  shown.push({ view, fig, w, h, parts: [base, heat, lines], label });
}

// The arrangement whose smallest image is largest, each image fitted to its cell.
function layout() {
  const grid = document.getElementById("grid");
  const box = grid.getBoundingClientRect();
  const sizes = Object.fromEntries(shown.map((s) => [s.view.key, [s.w, s.h]]));
  const fallback = shown.length ? [shown[0].w, shown[0].h] : [4, 5];
  let best = null;
  for (const [name, arr] of Object.entries(ARRANGEMENTS)) {
    const cellW = (box.width - GAP * (arr.cols - 1)) / arr.cols;
    const cellH = (box.height - GAP * (arr.rows - 1)) / arr.rows;
    const scales = Object.keys(arr.cell).map((key) => {
      const [w, h] = sizes[key] || fallback;
      return Math.min(cellW / w, cellH / h);
    });
    const score = Math.min(...scales);
    if (!best || score > best.score) best = { name, arr, cellW, cellH, score };
  }
  grid.dataset.layout = best.name;
  for (const fig of document.querySelectorAll("figure.view")) {
    const [c, r] = best.arr.cell[fig.dataset.view];
    Object.assign(fig.style, {
      left: `${c * (best.cellW + GAP)}px`, top: `${r * (best.cellH + GAP)}px`,
      width: `${best.cellW}px`, height: `${best.cellH}px`,
    });
  }
  for (const s of shown) {
    const scale = Math.min(best.cellW / s.w, best.cellH / s.h);
    const dw = s.w * scale, dh = s.h * scale;
    // Right views against the centre line from the left, left views from the right.
    const x = s.view.key[0] === "R" ? best.cellW - dw : 0;
    const y = (best.cellH - dh) / 2;
    for (const part of s.parts) {
      Object.assign(part.style, { left: `${x}px`, top: `${y}px`, width: `${dw}px`, height: `${dh}px` });
    }
    // The label in the image's top corner on the nipple side, away from the chest wall.
    Object.assign(s.label.style, { top: `${y + 4}px`, maxWidth: `${dw - 8}px` });
    if (s.view.key[0] === "R") {
      Object.assign(s.label.style, { left: `${x + 4}px`, right: "" });
    } else {
      Object.assign(s.label.style, { left: "", right: `${best.cellW - (x + dw) + 4}px` });
    }
    const cell = s.fig.getBoundingClientRect();
    s.fig.dataset.screen = JSON.stringify({
      x0: cell.left + x, y0: cell.top + y, scale, w: s.w, h: s.h,
      flip_h: s.view.flip_h, flip_v: s.view.flip_v,
    });
  }
}

function applyControls() {
  const show = document.getElementById("heatmap-toggle").checked;
  const opacity = document.getElementById("opacity").value / 100;
  for (const c of document.querySelectorAll("canvas.heatmap")) {
    c.style.display = show ? "" : "none";
    c.style.opacity = opacity;
  }
  const lines = document.getElementById("outline-toggle").checked;
  for (const c of document.querySelectorAll("canvas.outline")) c.style.display = lines ? "" : "none";
  document.body.classList.toggle("no-labels", !document.getElementById("label-toggle").checked);
}

// H heat-map, O outlines, L labels, [ and ] opacity.
function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const toggles = { h: "heatmap-toggle", o: "outline-toggle", l: "label-toggle" };
  const key = event.key.toLowerCase();
  if (toggles[key]) {
    const box = document.getElementById(toggles[key]);
    box.checked = !box.checked;
  } else if (key === "[" || key === "]") {
    const slider = document.getElementById("opacity");
    slider.value = Math.min(100, Math.max(0, Number(slider.value) + (key === "]" ? 10 : -10)));
  } else {
    return;
  }
  event.preventDefault();
  applyControls();
}

function drawColorbar(lut, threshold) {
  const c = document.getElementById("colorbar");
  const ctx = c.getContext("2d");
  const bar = ctx.createImageData(256, 12);
  const first = firstShownLevel(threshold);
  for (let x = 0; x < 256; x++) {
    const rgb = x < first ? [60, 60, 60] : [lut[x * 4], lut[x * 4 + 1], lut[x * 4 + 2]];
    for (let y = 0; y < 12; y++) bar.data.set([...rgb, 255], (y * 256 + x) * 4);
  }
  ctx.putImageData(bar, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(Math.min(254, first), 0, 2, 12);
  document.getElementById("legend-threshold").textContent =
    `saliency; colour from ${Math.round(threshold * 100)} %`;
}

// ?layout=WxH pins the page size in CSS pixels, for reproducible screenshots and printouts.
function pinLayout() {
  const match = /^(\d+)x(\d+)$/.exec(new URLSearchParams(location.search).get("layout") || "");
  if (match) {
    document.body.style.width = `${match[1]}px`;
    document.body.style.height = `${match[2]}px`;
  }
}

async function main() {
  pinLayout();
  const status = document.getElementById("status");
  for (const id of ["heatmap-toggle", "opacity", "outline-toggle", "label-toggle"]) {
    document.getElementById(id).addEventListener("input", applyControls);
  }
  document.addEventListener("keydown", onKey);
  try {
    const response = await fetch(`${orthancRoot}/mammo-ai/api/studies/${studyId}`);
    if (!response.ok) throw new Error(`study summary: HTTP ${response.status}`);
    const summary = await response.json();
    document.getElementById("clinical-label").hidden = !summary.not_for_clinical_use;
    const algo = summary.algorithm || {};
    document.getElementById("algorithm").textContent = algo.name
      ? `Model: ${algo.name} · version ${algo.version || "?"}` : "No AI results in this study yet";
    setScore("score-exam", summary.exam.malignant);
    setScore("score-breast-R", (summary.breasts.R || {}).malignant);
    setScore("score-breast-L", (summary.breasts.L || {}).malignant);
    const withMap = summary.views.find((v) => v.heatmap && v.heatmap.display_threshold != null);
    const threshold = withMap ? withMap.heatmap.display_threshold : DISPLAY_FLOOR;
    const lut = buildLut(threshold);
    drawColorbar(lut, threshold);
    document.body.dataset.threshold = String(threshold);
    const byKey = Object.fromEntries(summary.views.map((v) => [v.key, v]));
    const jobs = [], failed = [];
    for (const fig of document.querySelectorAll("figure.view")) {
      const view = byKey[fig.dataset.view];
      if (view) {
        // One image that cannot be loaded leaves its cell empty, not the page.
        jobs.push(showView(view, fig, lut).catch((error) => {
          fig.classList.add("missing");
          fig.innerHTML = `<figcaption>${fig.dataset.view}: ${error.message}</figcaption>`;
          failed.push(fig.dataset.view);
        }));
      } else {
        fig.classList.add("missing");
        fig.innerHTML = `<figcaption>${fig.dataset.view}: no image</figcaption>`;
      }
    }
    await Promise.all(jobs);
    applyControls();
    layout();
    window.addEventListener("resize", layout);
    const problems = failed.length ? ` (${failed.join(", ")} not loaded)` : "";
    status.textContent = `${summary.views.length} view(s)${problems} · keys: H heat-map, ` +
      "O outlines, L labels, [ ] opacity";
    status.dataset.state = failed.length ? "partial" : "ready";
  } catch (error) {
    status.textContent = `Error: ${error.message}`;
    status.dataset.state = "error";
  }
}

main();
