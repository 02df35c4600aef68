// polcache dashboard: polls /data.json once a second and draws every view as inline SVG.
// Hand-written (no plotting library) so the page needs nothing but this server. Each view's
// section gets data-received="1" once it has drawn data (the browser test checks that).
"use strict";

const W = 580, H = 230, M = { l: 52, r: 12, t: 8, b: 26 };
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
// After ten series the colours come again, dashed, then dotted...: the eleventh robot drawn as the first read as one.
const DASHES = ["", "6 3", "2 2", "8 3 2 3"], LEGEND_LINES = ["solid", "dashed", "dotted", "double"];
const dashOf = i => Math.floor(i / COLORS.length) % DASHES.length;
const OP_COLORS = { 0: "#1f4e79", 1: "#cfe2f3", 2: "#f6b26b", 3: "#b4a7d6" };
const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function text(parent, x, y, s, anchor) {
  const t = el("text", { x, y, "text-anchor": anchor || "start" }, parent);
  t.textContent = s;
  return t;
}

function haloed(label) {  // a reference line's label stays readable where curves pass under it
  label.setAttribute("style", "paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round");
  return label;
}

function fmt(v) {
  const a = Math.abs(v);
  return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 0.1 ? v.toFixed(2) : v.toPrecision(2);
}

// Round steps (1, 2 or 5 times a power of ten) for the axes, whole ones for counts: a count
// of safe stops read 1.57, 2.36, 3.15.
function niceTicks(lo, hi, integer, intervals = 4) {  // about that many steps between lo and hi
  const raw = (hi - lo || 1) / intervals, p = 10 ** Math.floor(Math.log10(raw)), m = raw / p;
  let step = (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  if (integer) step = Math.max(1, Math.round(step));
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9)), out = [];  // as many decimals as the step has
  for (let k = Math.ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * step; k++) {
    out.push([k * step, (k * step).toFixed(digits)]);
  }
  return out;
}

function frame(svg, x0, x1, y0, y1, integer) {
  const sx = v => M.l + (v - x0) / (x1 - x0 || 1) * (W - M.l - M.r);
  const sy = v => H - M.b - (v - y0) / (y1 - y0 || 1) * (H - M.t - M.b);
  el("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "none", stroke: "#ccc" }, svg);
  for (const [v, label] of niceTicks(y0, y1, integer)) {
    el("line", { x1: M.l, x2: W - M.r, y1: sy(v), y2: sy(v), stroke: "#eee" }, svg);
    text(svg, M.l - 4, sy(v) + 3, label, "end");
  }
  // round steps along x too (0.58, 1.16, 1.73 read as noise); a number at the right edge ends at its tick:
  // centred, it ran past the edge and was cut off
  for (const [v, label] of niceTicks(x0, x1, false, 6)) {  // the plot is wider than tall
    text(svg, sx(v), H - M.b + 13, label, sx(v) > W - M.r - 12 ? "end" : "middle");
  }
  return [sx, sy];
}

function range(values, pad) {
  const finite = values.filter(v => v !== null && Number.isFinite(v));
  if (!finite.length) return [0, 1];
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (pad) lo = Math.min(lo, 0);
  if (hi === lo) hi = lo + 1;
  return [lo, hi + (hi - lo) * 0.05];
}

// colors: each name's colour index, where not its position; references: reference lines' labels (red, dashed)
function legend(section, names, colors, references) {
  const div = document.createElement("div");
  div.className = "legend";
  const entry = (swatch, name) => {
    const span = document.createElement("span");
    span.innerHTML = swatch;
    span.appendChild(document.createTextNode(name));
    div.appendChild(span);
  };
  names.forEach((name, j) => {
    const i = colors ? colors[j] : j, color = COLORS[i % COLORS.length];
    entry(dashOf(i) ? `<i style="background:none;border-top:3px ${LEGEND_LINES[dashOf(i)]} ${color}"></i>`
                    : `<i style="background:${color}"></i>`, name);
  });
  (references || []).forEach(name => entry(`<i style="background:none;border-top:2px dashed #c00"></i>`, name));
  section.appendChild(div);
}

function drawLine(svg, section, view) {
  const series = view.series || [];
  const xs = series.flatMap(s => s.x), ys = series.flatMap(s => s.y).concat((view.hlines || []).map(h => h.y));
  // every time line over the run's whole span, so the views' axes line up
  const [x0, x1] = range(view.span_s ? xs.concat([0, view.span_s]) : xs, false), [y0, y1] = range(ys, true);
  const [sx, sy] = frame(svg, x0, x1, y0, y1, view.integer);
  text(svg, W - M.r, H - 2, "seconds since start", "end");
  series.forEach((s, i) => {
    let d = "", pen = "M";
    const present = j => j >= 0 && j < s.y.length && s.y[j] !== null;
    s.x.forEach((x, j) => {
      if (s.y[j] === null) { pen = "M"; return; }
      d += `${pen}${sx(x).toFixed(1)},${sy(s.y[j]).toFixed(1)} `;
      pen = "L";
      if (!present(j - 1) && !present(j + 1)) {  // a point with no line to draw (a second of records): a dot
        el("circle", { cx: sx(x).toFixed(1), cy: sy(s.y[j]).toFixed(1), r: 2, fill: COLORS[i % COLORS.length] }, svg);
      }
    });
    el("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.4,
                 ...(dashOf(i) ? { "stroke-dasharray": DASHES[dashOf(i)] } : {}) }, svg);
  });
  const hlines = view.hlines || [];
  hlines.forEach(h => {  // a value held for part of the run only (x0, x1: another run's settings) spans that part
    const left = h.x0 === undefined ? M.l : sx(Math.max(h.x0, x0));
    const right = h.x1 === undefined ? W - M.r : sx(Math.min(h.x1, x1));
    el("line", { x1: left, x2: right, y1: sy(h.y), y2: sy(h.y), stroke: "#c00", "stroke-dasharray": "4 3" }, svg);
  });
  // named in the legend, not over the line: a rate at its target ran under the label, the newest points hidden
  legend(section, series.map(s => s.name), null, hlines.map(h => `${h.name}: ${fmt(h.y)}`));
  return series.some(s => s.y.some(v => v !== null));
}

function drawHist(svg, section, view) {
  const series = view.series || [];
  if (!series.length) { frame(svg, 0, 1, 0, 1); return false; }
  const edges = series[0].edges;
  const [x0, x1] = [edges[0], edges[edges.length - 1]];
  const [y0, y1] = range(series.flatMap(s => s.counts), true);
  const [sx, sy] = frame(svg, x0, x1, y0, y1, view.integer);
  const mid = (M.t + H - M.b) / 2;
  text(svg, 10, mid, "count", "middle").setAttribute("transform", `rotate(-90 10 ${mid})`);
  series.forEach((s, i) => {
    let d = `M${sx(s.edges[0])},${sy(0)} `;
    s.counts.forEach((c, j) => { d += `L${sx(s.edges[j])},${sy(c)} L${sx(s.edges[j + 1])},${sy(c)} `; });
    d += `L${sx(s.edges[s.edges.length - 1])},${sy(0)}`;
    el("path", { d, fill: COLORS[i % COLORS.length], "fill-opacity": 0.3, stroke: COLORS[i % COLORS.length],
                 ...(dashOf(i) ? { "stroke-dasharray": DASHES[dashOf(i)] } : {}) }, svg);
  });
  const vlines = (view.vlines || []).filter(v => v.x >= x0 && v.x <= x1);
  const labelY = vlines.map((_, i) => M.t + 10 + 11 * i);  // one row per line, downwards: they never overlap
  vlines.forEach((v, i) => {
    el("line", { x1: sx(v.x), x2: sx(v.x), y1: M.t, y2: H - M.b, stroke: "#c00", "stroke-dasharray": "4 3" }, svg);
    const label = haloed(text(svg, sx(v.x) - 3, labelY[i], `${v.name}: ${fmt(v.x)}`, "end"));
    if (label.getComputedTextLength() > sx(v.x) - 3 - M.l) {  // it would run over the axis: right of the line
      label.setAttribute("x", sx(v.x) + 3);
      label.setAttribute("text-anchor", "start");
    }
  });
  legend(section, series.map(s => s.name));
  return series.some(s => s.counts.some(c => c > 0));
}

function drawBars(svg, section, view) {
  const cats = view.categories || [], stacks = view.stacks || [];
  const totals = cats.map((_, i) => stacks.reduce((a, s) => a + (s.values[i] || 0), 0));
  const [, x1] = range(totals, true);
  const sx = v => M.l + 80 + v / x1 * (W - M.l - 80 - M.r - 50);  // room for the total
  const rowH = Math.min(30, (H - M.t - M.b) / Math.max(cats.length, 1));
  cats.forEach((cat, i) => {
    let acc = 0;
    const y = M.t + i * rowH;
    text(svg, 4, y + rowH / 2 + 3, cat.length > 22 ? cat.slice(0, 21) + "…" : cat);
    stacks.forEach((s, j) => {
      const v = s.values[i] || 0;
      const r = el("rect", { x: sx(acc), y: y + 2, width: Math.max(sx(acc + v) - sx(acc), 0), height: rowH - 4,
                             fill: COLORS[(s.color ?? j) % COLORS.length] }, svg);
      el("title", {}, r).textContent = `${s.name}: ${fmt(v)} ms`;
      acc += v;
    });
    text(svg, sx(acc) + 3, y + rowH / 2 + 3, `${fmt(acc)} ms`);
  });
  legend(section, stacks.map(s => s.name), stacks.map((s, j) => s.color ?? j));
  return cats.length > 0 && totals.some(t => t > 0);
}

function drawHeatmap(svg, section, view) {
  const rows = view.rows || [], cols = view.cols || [], z = view.z || [];
  if (!rows.length) return false;
  const left = 110, cw = (W - left - M.r) / cols.length, rh = (H - M.t - M.b) / rows.length;
  rows.forEach((name, i) => {
    if (rows.length <= 24 || i % 2 === 0) text(svg, left - 4, M.t + (i + 0.5) * rh + 3, name, "end");
    cols.forEach((_, k) => {
      const r = el("rect", { x: left + k * cw, y: M.t + i * rh, width: cw + 0.3, height: rh + 0.3,
                             fill: OP_COLORS[z[i][k]] || "#000" }, svg);
      el("title", {}, r).textContent = `${name}, step ${k}: ${(view.legend || {})[z[i][k]]}`;
    });
  });
  cols.forEach(k => { if (cols.length <= 20 || k % 10 === 0) text(svg, left + (k + 0.5) * cw, H - M.b + 13, k, "middle"); });
  text(svg, W - M.r, H - 2, "denoising step", "end");
  const div = document.createElement("div");
  div.className = "legend";
  for (const [op, name] of Object.entries(view.legend || {})) {
    div.innerHTML += `<span><i style="background:${OP_COLORS[op]}"></i>${name}</span>`;
  }
  section.appendChild(div);
  return true;
}

const DRAW = { line: drawLine, hist: drawHist, bars: drawBars, heatmap: drawHeatmap };

function render(data) {
  const root = document.getElementById("views");
  for (const [id, view] of Object.entries(data)) {
    if (id.startsWith("_")) continue;
    let section = document.getElementById(`view-${id}`);
    if (!section) {
      section = document.createElement("section");
      section.className = "view";
      section.id = `view-${id}`;
      section.dataset.received = "0";
      root.appendChild(section);
    }
    section.innerHTML = `<h2></h2>`;
    section.querySelector("h2").textContent = view.title;
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` }, section);
    const drew = DRAW[view.type](svg, section, { ...view, span_s: data._meta.span_s });
    if (drew) section.dataset.received = "1";
    if (view.note) {
      const p = document.createElement("p");
      p.className = "note";
      p.textContent = view.note;
      section.appendChild(p);
    }
  }
  const meta = data._meta;
  renderSummary(meta.summary);
  const errors = Object.entries(meta.errors).map(([k, n]) => `${k} ${n}`).join(", ");
  document.getElementById("status").textContent =
    `robots: ${meta.robots.join(", ") || "none yet"} · ${fmt(meta.span_s)} s of records · interval ` +
    `${fmt(meta.interval_s)} s · refused messages: ${errors || "none"} · unreadable lines: ${meta.bad_lines}` +
    (meta.source_problems.length ? ` · not read: ${meta.source_problems.join("; ")}` : "") +
    meta.notes.map(n => ` · ${n}`).join("");
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function renderSummary(summary) {  // the whole run per robot, above the views (the report's table too)
  const box = document.getElementById("summary");
  box.innerHTML = "";
  if (!summary.rows.length) return;
  const title = document.createElement("h2");
  title.textContent = "whole run, per robot";
  box.appendChild(title);
  const table = document.createElement("table"), head = table.insertRow();
  summary.columns.forEach(c => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
  summary.rows.forEach(row => {
    const tr = table.insertRow();
    row.forEach(v => {  // counts as whole numbers (fmt wrote 4 safe stops as 4.00)
      const shown = v === null ? "-" : Number.isInteger(v) ? String(v) : typeof v === "number" ? fmt(v) : v;
      tr.insertCell().textContent = shown;
    });
  });
  box.appendChild(table);
}

async function update() {
  try {
    const response = await fetch("/data.json", { cache: "no-store" });
    render(await response.json());
  } catch (err) {
    document.getElementById("status").textContent = `no data: ${err}`;
  }
  setTimeout(update, 1000);
}

update();
