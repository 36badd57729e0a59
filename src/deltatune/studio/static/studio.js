// deltatune studio: live curves on a run's page, the YAML preview on the launch page, the playground's
// streamed chats. No libraries.
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

// ---- playground: the base and up to three adapters answer each message side by side, streamed ----------
function playground(section) {
  const api = section.dataset.api + "/v1/chat/completions";
  const most = Number(section.dataset.most);
  const token = document.querySelector('meta[name="studio-token"]').content;
  const columns = document.getElementById("columns");
  const chats = new Map(); // model -> [{role, content}], its own answers in its own history
  let base = null, chosen = section.dataset.chosen, controllers = [];

  function node(tag, cls, text, parent) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    if (parent) parent.appendChild(n);
    return n;
  }

  function shownModels() {
    const picked = [...document.querySelectorAll("#adapters input:checked")].map((i) => i.value);
    return base ? [base, ...picked] : [];
  }

  function layColumns() {
    const models = shownModels();
    for (const col of [...columns.children]) if (!models.includes(col.dataset.model)) col.remove();
    for (const model of models) {
      if (columns.querySelector(`[data-model="${CSS.escape(model)}"]`)) continue;
      const col = node("div", "column", undefined, columns);
      col.dataset.model = model;
      node("h3", "", model === base ? model + " (base)" : model, col);
      node("div", "turns", undefined, col);
      for (const turn of chats.get(model) || []) node("div", "turn " + turn.role, turn.content, col.lastChild);
    }
  }

  function showAdapters(names) {
    const box = document.getElementById("adapters");
    const legend = box.querySelector("legend");
    box.replaceChildren(legend);
    if (!names.length) node("span", "", "No run on this base has kept an adapter yet.", box).id = "no-adapters";
    for (const name of names) {
      const label = node("label", "", undefined, box);
      const input = node("input", "", undefined, label);
      Object.assign(input, { type: "checkbox", value: name, checked: name === chosen });
      input.dataset.adapter = name;
      label.append(" " + name);
      input.addEventListener("change", () => {
        if (document.querySelectorAll("#adapters input:checked").length > most) input.checked = false;
        layColumns();
      });
    }
    layColumns();
  }

  async function watchBase() {
    const reply = await (await fetch("/api/playground")).json();
    const state = document.getElementById("base-state");
    state.textContent = reply.state;
    state.className = "status " + reply.state;
    document.getElementById("base-error").textContent = reply.error || "";
    if (reply.state === "loading") return setTimeout(watchBase, 500);
    if (reply.state === "ready" && reply.base !== base) {
      base = reply.base;
      chats.clear();
      columns.replaceChildren();
      showAdapters(reply.runs);
    }
  }

  function settings() {
    const number = (id) => document.getElementById(id).value.trim();
    const body = { temperature: Number(number("temperature")), top_p: Number(number("top-p")),
                   max_tokens: Number(number("max-tokens")) };
    if (number("seed") !== "") body.seed = Number(number("seed"));
    return body;
  }

  // One column's answer: POST with stream=true and append each delta as it arrives (server-sent events).
  async function answer(model, bubble, history, controller) {
    const system = document.getElementById("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...history] : history;
    let text = "", chunks = 0, finish = null;
    try {
      const response = await fetch(api, {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-Studio-Token": token },
        body: JSON.stringify({ model, messages, stream: true, ...settings() }),
      });
      if (!response.ok) {
        const err = await response.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || err.detail || "HTTP " + response.status);
      }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = pending.indexOf("\n\n")) >= 0) {
          const line = pending.slice(0, cut).replace(/^data: /, "");
          pending = pending.slice(cut + 2);
          if (line === "[DONE]") continue;
          const event = JSON.parse(line);
          if (event.error) throw new Error(event.error.message);
          const choice = event.choices[0];
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            chunks += 1;
            bubble.firstChild.textContent = text;
            bubble.dataset.chunks = chunks;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (e) {
      finish = controller.signal.aborted ? "stopped" : "error";
      if (!controller.signal.aborted) node("div", "error", String(e.message || e), bubble);
    }
    history.push({ role: "assistant", content: text });
    bubble.querySelector(".finish").textContent = finish || "";
    bubble.dataset.finish = finish || "stop";
  }

  document.getElementById("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = document.getElementById("message");
    const message = box.value.trim();
    if (!message || !base) return;
    box.value = "";
    controllers = [];
    const send = document.getElementById("send");
    send.disabled = true;
    await Promise.all(shownModels().map((model) => {
      const history = chats.get(model) || [];
      chats.set(model, history);
      history.push({ role: "user", content: message });
      const turns = columns.querySelector(`[data-model="${CSS.escape(model)}"] .turns`);
      node("div", "turn user", message, turns);
      const bubble = node("div", "turn assistant", undefined, turns);
      node("span", "text", "", bubble);
      node("span", "finish", "", bubble);
      const controller = new AbortController();
      controllers.push(controller);
      return answer(model, bubble, history, controller);
    }));
    send.disabled = false;
  });
  document.getElementById("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      document.getElementById("chat-form").requestSubmit();
    }
  });
  document.getElementById("stop-chat").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  document.getElementById("clear").addEventListener("click", () => { chats.clear(); columns.replaceChildren(); layColumns(); });
  watchBase();
}

// ---- a report job's page: its output as it prints, and the page anew when it ends ----------------------------
function watchJob(section) {
  const name = section.dataset.job, initial = section.dataset.status;
  async function poll() {
    try {
      const reply = await (await fetch(`/api/jobs/${name}`)).json();
      document.getElementById("job-log").textContent = reply.log;
      if (reply.status !== initial) return window.location.reload();
    } catch (e) { /* the studio restarting: try again */ }
    setTimeout(poll, POLL_MS);
  }
  if (initial === "running") poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const curves = document.getElementById("curves");
  if (curves) watchRun(curves);
  const form = document.getElementById("launch-form");
  if (form) previewLaunch(form);
  const chat = document.getElementById("playground");
  if (chat) playground(chat);
  const job = document.getElementById("job");
  if (job) watchJob(job);
});
