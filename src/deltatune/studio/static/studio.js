// deltatune studio: live curves on a run's page, the YAML preview on the launch page. No libraries.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const MAX_DRAWN = 2000; // points per line drawn; every point is still counted

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// One panel: series = {label: [[step, value], ...]}, drawn as lines on shared axes.
function drawPanel(holder, id, title, series) {
  let svg = document.getElementById(id);
  if (!svg) {
    svg = el("svg", { id, class: "curve", width: 420, height: 240, "data-points": 0 });
    holder.appendChild(svg);
  }
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const all = Object.values(series).flat();
  svg.setAttribute("data-points", all.length);
  el("text", { x: 8, y: 14 }, svg).textContent = title;
  if (!all.length) return;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) {  // loops, not Math.min(...): a long run has more points than call arguments
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  const W = 420, H = 240, L = 48, B = 24, T = 22;
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - 8);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0 || 1)) * (H - B - T);
  el("line", { x1: L, y1: H - B, x2: W - 8, y2: H - B, stroke: "#999" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }, svg);
  el("text", { x: 2, y: sy(y1) + 4 }, svg).textContent = y1.toPrecision(3);
  el("text", { x: 2, y: sy(y0) + 4 }, svg).textContent = y0.toPrecision(3);
  el("text", { x: L, y: H - 6 }, svg).textContent = "step " + x0;
  el("text", { x: W - 70, y: H - 6 }, svg).textContent = "step " + x1;
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  Object.entries(series).forEach(([label, points], i) => {
    const color = colors[i % colors.length];
    const every = Math.max(1, Math.floor(points.length / MAX_DRAWN));  // the SVG stays light on long runs
    const drawn = points.filter((p, j) => j % every === 0 || j === points.length - 1);
    const d = drawn.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    el("path", { d, fill: "none", stroke: color, "stroke-width": 1.5, class: "series", "data-label": label }, svg);
    if (points.length === 1) el("circle", { cx: sx(points[0][0]), cy: sy(points[0][1]), r: 3, fill: color }, svg);
    el("text", { x: W - 150, y: T + 14 * (i + 1), fill: color }, svg).textContent = label + " (" + points.length + ")";
  });
}

function watchRun(section) {
  const name = section.dataset.run, metric = section.dataset.metric;
  const initial = section.dataset.status;
  const records = [];
  let offset = 0;
  async function poll() {
    let reply;
    try {
      const response = await fetch(`/api/runs/${name}/metrics?offset=${offset}`);
      if (!response.ok) throw new Error(response.status);
      reply = await response.json();
    } catch (e) {
      setTimeout(poll, POLL_MS);
      return;
    }
    offset = reply.offset;
    records.push(...reply.records);
    const train = records.filter((r) => r.split === "train" && "loss" in r);
    const valid = records.filter((r) => r.split === "validation");
    drawPanel(section, "curve-loss", "loss", {
      train: train.map((r) => [r.step, r.loss]),
      validation: valid.filter((r) => "loss" in r).map((r) => [r.step, r.loss]),
    });
    if (metric !== "loss") {
      drawPanel(section, "curve-metric", "validation " + metric, {
        [metric]: valid.filter((r) => metric in r && !r.loss_only).map((r) => [r.step, r[metric]]),
      });
    }
    const status = document.getElementById("status");
    const steps = document.getElementById("steps");
    if (steps && records.length) steps.textContent = records[records.length - 1].step;
    if (reply.status !== initial) {
      window.location.reload(); // the page shows what the new state has (summary, resume, the error)
      return;
    }
    if (status) status.textContent = reply.status;
    setTimeout(poll, POLL_MS); // an ended run too: it may be resumed, here or from a terminal
  }
  poll();
}

function previewLaunch(form) {
  const out = document.getElementById("preview"), err = document.getElementById("preview-error");
  let timer = null;
  async function update() {
    const body = new FormData(form);
    const response = await fetch("/launch/preview", {
      method: "POST", body, headers: { "X-Studio-Token": body.get("token") },
    });
    if (!response.ok) return;
    const reply = await response.json();
    out.textContent = reply.yaml;
    err.textContent = reply.error || "";
  }
  form.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(update, 300);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const curves = document.getElementById("curves");
  if (curves) watchRun(curves);
  const form = document.getElementById("launch-form");
  if (form) previewLaunch(form);
});
