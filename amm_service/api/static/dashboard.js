// The AMM dashboard: polls /api/history (the samples since the last one seen) and /api/status
// (GetStatus as JSON) every interval and draws plain SVG. No library: nothing to fetch from a
// CDN, nothing to vendor, and the page stays a few kilobytes.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAX_SAMPLES = 2700;
const PALETTE = ["#3a6fc4", "#e07b39", "#2a9d8f", "#c44e52", "#8172b2", "#937860",
                 "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"];
const samples = [];
let lastAt = 0;
let intervalMs = 2000;
const colours = new Map();

function colour(name) {
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function setStat(id, value, text) {
  const node = document.getElementById(id);
  node.dataset.value = String(value);
  node.textContent = text === undefined ? String(value) : text;
}

function parseSeconds(text) {
  const m = /^([0-9.]+)s$/.exec(text || "");
  return m ? Number(m[1]) : 2;
}

// -- charts -----------------------------------------------------------------------------------

// Runs of samples without a gap, as [first, last] indexes: where no sample was taken (the AMM was
// restarting, or its loop was held up), the charts show nothing rather than a line across what
// nobody saw.
function runs() {
  const gap = Math.max(5, 3 * intervalMs / 1000);
  const out = [];
  let first = 0;
  for (let i = 1; i <= samples.length; i++) {
    if (i === samples.length || samples[i].at - samples[i - 1].at > gap) {
      out.push([first, i - 1]);
      first = i;
    }
  }
  return out;
}

// Runs of samples taken with the AMM cycling or stopped, as [first, last, running]: a stopped AMM
// keeps sampling (running: false), and the memory chart shades those periods, so memory with the
// AMM off and on reads side by side. Samples of an AMM without the field count as running.
function periods() {
  const out = [];
  let first = 0;
  const on = (s) => s.running !== false;
  for (let i = 1; i <= samples.length; i++) {
    if (i === samples.length || on(samples[i]) !== on(samples[first])) {
      out.push([first, i - 1, on(samples[first])]);
      first = i;
    }
  }
  return out;
}

function count(v) { return Number.isInteger(v) ? String(v) : v.toFixed(1); }

function frame(svg) {
  const box = svg.viewBox.baseVal;
  return { w: box.width, h: box.height, left: 56, right: 8, top: 8, bottom: 18 };
}

function yAxis(svg, f, max, format) {
  for (const frac of [0, 0.5, 1]) {
    const y = f.top + (f.h - f.top - f.bottom) * (1 - frac);
    el("line", { x1: f.left, x2: f.w - f.right, y1: y, y2: y, class: "axis" }, svg);
    const label = el("text", { x: f.left - 4, y: y + 3, "text-anchor": "end" }, svg);
    label.textContent = format(max * frac);
  }
}

function timeAxis(svg, f, t0, t1) {
  const label = el("text", { x: f.left, y: f.h - 4 }, svg);
  label.textContent = new Date(t0 * 1000).toLocaleTimeString();
  const end = el("text", { x: f.w - f.right, y: f.h - 4, "text-anchor": "end" }, svg);
  end.textContent = new Date(t1 * 1000).toLocaleTimeString();
}

function drawMemory() {
  const svg = document.getElementById("memory-chart");
  clear(svg);
  const f = frame(svg);
  if (samples.length === 0) return;
  const names = [];
  for (const s of samples) for (const w of s.workers) if (!names.includes(w.name)) names.push(w.name);
  names.sort();
  // layers bottom-up: each worker's managed memory, then the rest of its process memory
  const layers = [];
  for (const name of names) {
    layers.push({ name, part: "managed", value: (w) => w.managed });
    layers.push({ name, part: "unmanaged", value: (w) => Math.max(0, w.process - w.managed) });
  }
  const totals = samples.map((s) => s.workers.reduce((a, w) => a + Math.max(w.process, w.managed), 0));
  const max = Math.max(1, ...totals);
  const t0 = samples[0].at;
  const t1 = Math.max(samples[samples.length - 1].at, t0 + 1);
  const x = (t) => f.left + (f.w - f.left - f.right) * (t - t0) / (t1 - t0);
  const y = (v) => f.top + (f.h - f.top - f.bottom) * (1 - v / max);
  yAxis(svg, f, max, bytes);
  timeAxis(svg, f, t0, t1);
  // each period reaches to the next one's first sample: the shading has no seams
  const spans = periods().map(([first, last, on]) => ({
    on, x0: x(samples[first].at), x1: x(samples[Math.min(last + 1, samples.length - 1)].at),
  }));
  for (const span of spans) {
    if (!span.on) {
      el("rect", {
        x: span.x0.toFixed(1), y: f.top, width: Math.max(1, span.x1 - span.x0).toFixed(1),
        height: f.h - f.top - f.bottom, class: "amm-off",
      }, svg);
    }
  }
  const base = samples.map(() => 0);
  const parts = runs();
  for (const layer of layers) {
    const top = samples.map((s, i) => {
      const w = s.workers.find((v) => v.name === layer.name);
      return base[i] + (w ? layer.value(w) : 0);
    });
    let d = "";
    for (const [first, last] of parts) {
      for (let i = first; i <= last; i++) d += (i === first ? "M" : "L") + x(samples[i].at).toFixed(1) + "," + y(top[i]).toFixed(1);
      for (let i = last; i >= first; i--) d += "L" + x(samples[i].at).toFixed(1) + "," + y(base[i]).toFixed(1);
      d += "Z";
    }
    el("path", {
      d, fill: colour(layer.name), "fill-opacity": layer.part === "managed" ? 0.85 : 0.3,
      "data-worker": layer.name, "data-part": layer.part,
    }, svg);
    top.forEach((v, i) => { base[i] = v; });
  }
  for (const span of spans) {
    if (span.x1 - span.x0 < 50) continue;
    const label = el("text", { x: (span.x0 + 4).toFixed(1), y: f.top + 10, class: "period" }, svg);
    label.textContent = span.on ? "AMM on" : "AMM off";
  }
  const legend = document.getElementById("memory-legend");
  legend.textContent = "";
  if (spans.some((span) => !span.on)) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = "amm-off";
    item.append(swatch, "AMM off (stopped: memory sampled, nothing done)");
    legend.append(item);
  }
  for (const name of names) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = colour(name);
    item.append(swatch, name);
    legend.append(item);
  }
}

function drawActions() {
  const svg = document.getElementById("actions-chart");
  clear(svg);
  const f = frame(svg);
  const shown = samples.slice(-120);
  if (shown.length === 0) return;
  const max = Math.max(1, ...shown.map((s) => Math.max(s.replicated, s.dropped + s.refused)));
  const mid = f.top + (f.h - f.top - f.bottom) / 2;
  const half = (f.h - f.top - f.bottom) / 2;
  const step = (f.w - f.left - f.right) / Math.max(shown.length, 30);
  for (const [label, y] of [["+" + max, f.top + 3], ["0", mid + 3], ["-" + max, f.top + 2 * half + 3]]) {
    const t = el("text", { x: f.left - 4, y, "text-anchor": "end" }, svg);
    t.textContent = label;
  }
  el("line", { x1: f.left, x2: f.w - f.right, y1: mid, y2: mid, class: "axis" }, svg);
  shown.forEach((s, i) => {
    const x0 = f.left + i * step;
    const w = Math.max(1, step - 1);
    const up = half * s.replicated / max;
    const down = half * s.dropped / max;
    const refused = half * s.refused / max;
    if (up) el("rect", { x: x0, y: mid - up, width: w, height: up, fill: "#2a8a4a", class: "replicated" }, svg);
    if (down) el("rect", { x: x0, y: mid, width: w, height: down, fill: "#c33", class: "dropped" }, svg);
    if (refused) el("rect", { x: x0, y: mid + down, width: w, height: refused, fill: "#d80", class: "refused" }, svg);
  });
  timeAxis(svg, f, shown[0].at, shown[shown.length - 1].at);
}

function drawGoals() {
  const svg = document.getElementById("goals-chart");
  clear(svg);
  const f = frame(svg);
  if (samples.length === 0) return;
  const max = Math.max(1, ...samples.map((s) => Math.max(s.below_goal, s.lost)));
  const t0 = samples[0].at;
  const t1 = Math.max(samples[samples.length - 1].at, t0 + 1);
  const x = (t) => f.left + (f.w - f.left - f.right) * (t - t0) / (t1 - t0);
  const y = (v) => f.top + (f.h - f.top - f.bottom) * (1 - v / max);
  yAxis(svg, f, max, count);
  const parts = runs();
  for (const [field, stroke] of [["below_goal", "#d80"], ["lost", "#c33"]]) {
    let d = "";
    for (const [first, last] of parts) {
      for (let i = first; i <= last; i++) d += (i === first ? "M" : "L") + x(samples[i].at).toFixed(1) + "," + y(samples[i][field]).toFixed(1);
    }
    el("path", { d, fill: "none", stroke, "stroke-width": 2, class: field }, svg);
  }
  timeAxis(svg, f, t0, t1);
}

// -- tables -----------------------------------------------------------------------------------

function drawWorkers() {
  const body = document.querySelector("#workers tbody");
  body.textContent = "";
  const last = samples[samples.length - 1];
  if (!last) return;
  for (const w of last.workers) {
    const row = document.createElement("tr");
    row.dataset.worker = w.name;
    row.dataset.status = w.status;
    const name = document.createElement("td");
    name.textContent = w.name;
    name.title = w.address;
    const status = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "status status-" + w.status;
    badge.textContent = w.status;
    status.append(badge);
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const scale = Math.max(w.limit, w.process, w.managed, 1);
    for (const [part, value] of [["process", w.process], ["managed", w.managed]]) {
      const span = document.createElement("span");
      span.className = part;
      span.style.width = (100 * value / scale).toFixed(1) + "%";
      bar.append(span);
    }
    bar.title = w.limit ? (100 * w.process / w.limit).toFixed(0) + "% of the limit" : "no limit";
    barCell.append(bar);
    row.append(name, status, barCell);
    for (const [field, value] of [["managed", w.managed], ["process", w.process], ["limit", w.limit]]) {
      const cell = document.createElement("td");
      cell.className = "num " + field;
      cell.dataset.value = String(value);
      cell.textContent = field === "limit" && !value ? "none" : bytes(value);
      row.append(cell);
    }
    body.append(row);
  }
}

function drawStatus(status) {
  const totals = status.totals || {};
  const n = (v) => Number(v || 0);
  setStat("stat-workers", n(totals.workers));
  setStat("stat-keys", n(totals.keys));
  setStat("stat-replicas", n(totals.replicas));
  setStat("stat-managed", n(totals.managed_bytes), bytes(n(totals.managed_bytes)));
  setStat("stat-process", n(totals.process_bytes), bytes(n(totals.process_bytes)));
  setStat("stat-in-flight", n(totals.directives_in_flight));
  setStat("stat-with-goal", n(totals.keys_with_goal));
  setStat("stat-below-goal", n(totals.keys_below_goal));
  setStat("stat-lost", n(totals.lost_keys));
  setStat("stat-cycles", n(status.cycles));
  setStat("stat-epoch", n(status.epoch));
  const running = document.getElementById("running");
  running.textContent = status.running ? "running" : "stopped";
  running.className = "badge " + (status.running ? "on" : "off");
  if (status.startup_grace) running.textContent += " (start-up grace)";
  intervalMs = Math.max(250, 1000 * parseSeconds(status.interval));
  const body = document.querySelector("#events tbody");
  body.textContent = "";
  for (const e of (status.recent_events || []).slice(0, 15)) {
    const row = document.createElement("tr");
    if (["worker-dead", "key-lost", "retire-abandoned"].includes(e.kind)) row.className = "warning";
    for (const text of [e.at ? new Date(e.at).toLocaleTimeString() : "", e.kind, e.worker || "", e.message]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
}

// -- polling ----------------------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": " + response.status + " " + (await response.text()));
  return response.json();
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [history, status] = await Promise.all([
      getJson("/api/history?after=" + lastAt), getJson("/api/status"),
    ]);
    for (const s of history.samples) {
      // each worker comes as [name, address, managed, process, limit, status] (WORKER_FIELDS)
      s.workers = s.workers.map(([name, address, managed, process, limit, status]) => (
        { name, address, managed, process, limit, status }));
      samples.push(s);
    }
    if (samples.length > MAX_SAMPLES) samples.splice(0, samples.length - MAX_SAMPLES);
    if (samples.length) lastAt = samples[samples.length - 1].at;
    drawStatus(status);
    drawMemory();
    drawWorkers();
    drawActions();
    drawGoals();
    error.hidden = true;
    document.body.dataset.state = "live";
    document.body.dataset.samples = String(samples.length);
  } catch (err) {
    error.textContent = String(err.message || err);
    error.hidden = false;
    document.body.dataset.state = "error";
  }
  setTimeout(refresh, intervalMs);
}

refresh();
