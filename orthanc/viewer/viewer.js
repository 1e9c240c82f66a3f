// Mammo AI overlay viewer: four views in the standard hanging order with the saliency heat-map
// of our fractional SEG, the regions and scores of our SRs. Everything comes from this Orthanc
// (same origin): the summary from the plugin, image PNGs from Orthanc's own decoders.
"use strict";

const studyId = location.pathname.replace(/\/+$/, "").split("/").pop();
const root = "../../";  // the Orthanc root, relative to /mammo-ai/studies/{id}

// Colour map (p in [0, 1] -> RGB), after "jet": blue, cyan, green, yellow, red.
const STOPS = [
  [0.0, [0, 0, 160]], [0.25, [0, 120, 255]], [0.45, [0, 220, 120]],
  [0.65, [255, 230, 0]], [0.85, [255, 110, 0]], [1.0, [220, 0, 0]],
];
const LUT = buildLut();

function buildLut() {
  const lut = new Uint8ClampedArray(256 * 4);
  for (let v = 0; v < 256; v++) {
    const p = v / 255;
    let i = 1;
    while (i < STOPS.length - 1 && STOPS[i][0] < p) i++;
    const [p0, c0] = STOPS[i - 1], [p1, c1] = STOPS[i];
    const t = Math.min(1, Math.max(0, (p - p0) / (p1 - p0)));
    for (let k = 0; k < 3; k++) lut[v * 4 + k] = c0[k] + t * (c1[k] - c0[k]);
    // Transparent where there is no saliency, fully opaque from p = 0.15 up.
    lut[v * 4 + 3] = p < 0.02 ? 0 : Math.min(255, (p / 0.15) * 255);
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
    img.onerror = () => reject(new Error(`cannot load ${url}`));
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

// Without PatientOrientation: the chest wall is the brighter edge; put it toward the centre.
function guessFlip(img, side) {
  const small = canvas(64, 64, "");
  const ctx = small.getContext("2d");
  ctx.drawImage(img, 0, 0, 64, 64);
  const data = ctx.getImageData(0, 0, 64, 64).data;
  let left = 0, right = 0;
  for (let y = 0; y < 64; y++) {
    for (let x = 0; x < 16; x++) left += data[(y * 64 + x) * 4];
    for (let x = 48; x < 64; x++) right += data[(y * 64 + x) * 4];
  }
  const chestWallRight = right > left;
  return side === "R" ? !chestWallRight : chestWallRight;
}

async function drawHeatmap(view, w, h, target) {
  const img = await loadImage(
    `${root}instances/${view.heatmap.instance}/frames/${view.heatmap.frame}/image-uint8`);
  const tmp = canvas(w, h, "");
  const tctx = tmp.getContext("2d");
  tctx.drawImage(img, 0, 0);
  const pixels = tctx.getImageData(0, 0, w, h);
  const d = pixels.data;
  const scale = 255 / (view.heatmap.max_value || 255);
  for (let i = 0; i < d.length; i += 4) {
    const v = Math.min(255, Math.round(d[i] * scale)) * 4;
    d[i] = LUT[v]; d[i + 1] = LUT[v + 1]; d[i + 2] = LUT[v + 2]; d[i + 3] = LUT[v + 3];
  }
  tctx.putImageData(pixels, 0, 0);
  const ctx = target.getContext("2d");
  orient(ctx, view, w, h);
  ctx.drawImage(tmp, 0, 0);
}

function drawOutline(view, w, h, target) {
  const ctx = target.getContext("2d");
  orient(ctx, view, w, h);
  ctx.strokeStyle = "#ffff00";
  ctx.lineWidth = Math.max(2, w / 300);
  ctx.beginPath();
  view.outline.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.closePath();
  ctx.stroke();
}

// Where source pixel (0, 0) lands on screen and how big a pixel is (object-fit: contain).
function screenGeometry(fig, view, w, h) {
  const box = fig.querySelector(".stack").getBoundingClientRect();
  const scale = Math.min(box.width / w, box.height / h);
  const dw = w * scale, dh = h * scale;
  const x0 = view.key[0] === "R" ? box.right - dw : box.left;
  return { x0, y0: box.top + (box.height - dh) / 2, scale, w, h,
           flip_h: view.flip_h, flip_v: view.flip_v };
}

async function showView(view, fig) {
  const stack = document.createElement("div");
  stack.className = "stack";
  fig.appendChild(stack);
  const caption = document.createElement("figcaption");
  caption.innerHTML = `${view.key.replace("-", " ")} · image <b class="score-image" ` +
    `id="score-image-${view.key}" data-value="${view.malignant ?? ""}">` +
    `${percent(view.malignant)}</b>` +
    (view.benign !== null ? ` · benign ${percent(view.benign)}` : "");
  fig.appendChild(caption);

  const img = await loadImage(`${root}instances/${view.instance}/preview`);
  const w = img.naturalWidth, h = img.naturalHeight;
  if (!view.orientation_known) view.flip_h = guessFlip(img, view.key[0]);
  const base = canvas(w, h, "base");
  const heat = canvas(w, h, "heatmap");
  const lines = canvas(w, h, "outline");
  stack.append(base, heat, lines);
  const bctx = base.getContext("2d");
  orient(bctx, view, w, h);
  bctx.drawImage(img, 0, 0);
  if (view.heatmap) await drawHeatmap(view, w, h, heat);
  if (view.outline && !coversImage(view.outline, w, h)) drawOutline(view, w, h, lines);
  fig.dataset.heatmap = view.heatmap ? "yes" : "no";
  return () => { fig.dataset.screen = JSON.stringify(screenGeometry(fig, view, w, h)); };
}

// A region as large as the image (no finding was localised) is not worth a frame.
function coversImage(outline, w, h) {
  const xs = outline.map((p) => p[0]), ys = outline.map((p) => p[1]);
  const area = (Math.max(...xs) - Math.min(...xs)) * (Math.max(...ys) - Math.min(...ys));
  return area > 0.9 * w * h;
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
}

function drawColorbar() {
  const c = document.getElementById("colorbar");
  const ctx = c.getContext("2d");
  const bar = ctx.createImageData(256, 12);
  for (let x = 0; x < 256; x++) {
    for (let y = 0; y < 12; y++) {
      for (let k = 0; k < 3; k++) bar.data[(y * 256 + x) * 4 + k] = LUT[x * 4 + k];
      bar.data[(y * 256 + x) * 4 + 3] = 255;
    }
  }
  ctx.putImageData(bar, 0, 0);
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
  drawColorbar();
  for (const id of ["heatmap-toggle", "opacity", "outline-toggle"]) {
    document.getElementById(id).addEventListener("input", applyControls);
  }
  try {
    const response = await fetch(`../api/studies/${studyId}`);
    if (!response.ok) throw new Error(`study summary: HTTP ${response.status}`);
    const summary = await response.json();
    document.getElementById("clinical-label").hidden = !summary.not_for_clinical_use;
    const algo = summary.algorithm || {};
    document.getElementById("algorithm").textContent = algo.name
      ? `Model: ${algo.name} · version ${algo.version || "?"}` : "No AI results in this study yet";
    setScore("score-exam", summary.exam.malignant);
    setScore("score-breast-R", (summary.breasts.R || {}).malignant);
    setScore("score-breast-L", (summary.breasts.L || {}).malignant);
    const byKey = Object.fromEntries(summary.views.map((v) => [v.key, v]));
    const jobs = [];
    for (const fig of document.querySelectorAll("figure.view")) {
      const view = byKey[fig.dataset.view];
      if (view) {
        jobs.push(showView(view, fig));
      } else {
        fig.classList.add("missing");
        fig.innerHTML = `<div class="stack"></div><figcaption>${fig.dataset.view}</figcaption>`;
      }
    }
    const recordGeometry = await Promise.all(jobs);
    applyControls();
    recordGeometry.forEach((record) => record());  // once the layout is final
    status.textContent = `${summary.views.length} view(s)`;
    status.dataset.state = "ready";
  } catch (error) {
    status.textContent = `Error: ${error.message}`;
    status.dataset.state = "error";
  }
}

main();
