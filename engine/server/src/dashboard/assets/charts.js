// Keyvex admin dashboard: tiny chart library drawing plain inline SVG.
// Line, vertical bar (grouped or stacked) and horizontal bar charts with axes, gridlines, legends,
// threshold lines and native tooltips. Every drawn datum is an element with class "mark" and
// data-series / data-label / data-value attributes, so tests (and people) can inspect it.

const SVG_NS = "http://www.w3.org/2000/svg";
const HEIGHT = 240;
const MARGIN = { top: 14, right: 16, bottom: 34, left: 62 };

export const PALETTE = [
  "#3b6fd8", "#f28e2b", "#2f9e6e", "#e15759", "#76b7b2",
  "#b07aa1", "#edc948", "#9c755f", "#ff9da7", "#5c6b80",
];

function svgEl(name, attrs = {}, parent = null) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

function titled(el, text) {
  const t = document.createElementNS(SVG_NS, "title");
  t.textContent = text;
  el.appendChild(t);
  return el;
}

/** "Nice" axis ticks from 0 to at least max: 1, 2, 2.5 or 5 times a power of ten. */
export function niceTicks(max, count = 5) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const pow = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * pow).find((s) => s >= raw);
  const ticks = [];
  for (let v = 0; v < max + step * 0.5; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

/** Replaces the content of `host` with a friendly empty-state message. */
export function emptyState(host, message) {
  host.replaceChildren();
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = message;
  host.appendChild(p);
}

function frame(host, kind) {
  host.replaceChildren();
  const width = Math.max(280, Math.floor(host.clientWidth || 560));
  const svg = svgEl("svg", {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    width: "100%",
    height: HEIGHT,
    role: "img",
    class: "chart",
    "data-chart": kind,
  });
  host.appendChild(svg);
  return { svg, width, plotW: width - MARGIN.left - MARGIN.right, plotH: HEIGHT - MARGIN.top - MARGIN.bottom };
}

function legend(host, series) {
  if (series.length < 2) return;
  const ul = document.createElement("ul");
  ul.className = "legend";
  for (const s of series) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = s.color;
    li.append(sw, document.createTextNode(s.name));
    ul.appendChild(li);
  }
  host.appendChild(ul);
}

function yAxis(g, ticks, y, plotW, fmt) {
  for (const t of ticks) {
    const yy = y(t);
    svgEl("line", { x1: 0, x2: plotW, y1: yy, y2: yy, class: t === 0 ? "axis" : "gridline" }, g);
    const label = svgEl("text", { x: -8, y: yy + 4, "text-anchor": "end", class: "tick" }, g);
    label.textContent = fmt(t);
  }
}

/** Indices of at most `max` evenly spaced labels (always the first and the last). */
function labelIndices(n, max) {
  if (n <= max) return [...Array(n).keys()];
  const step = Math.ceil((n - 1) / (max - 1));
  const out = [];
  for (let i = 0; i < n; i += step) out.push(i);
  if (out[out.length - 1] !== n - 1) {
    if (n - 1 - out[out.length - 1] < step / 2) out.pop();
    out.push(n - 1);
  }
  return out;
}

function xLabels(g, labels, xCenter, plotH, plotW) {
  const max = Math.max(2, Math.floor(plotW / 78));
  for (const i of labelIndices(labels.length, max)) {
    const t = svgEl("text", { x: xCenter(i), y: plotH + 20, "text-anchor": "middle", class: "tick" }, g);
    t.textContent = labels[i];
  }
}

function thresholdLine(g, threshold, y, plotW, maxY) {
  if (!threshold || !(threshold.value <= maxY)) return;
  const yy = y(threshold.value);
  svgEl("line", { x1: 0, x2: plotW, y1: yy, y2: yy, class: "threshold" }, g);
  const t = svgEl("text", { x: plotW - 4, y: yy - 5, "text-anchor": "end", class: "threshold-label" }, g);
  t.textContent = threshold.label;
}

/**
 * Line chart over categorical x (time buckets).
 * opts: { labels: [str], tooltipLabels?: [str], series: [{name, color, values: [number|null]}],
 *         format: (n) => str, threshold?: {value, label} }
 * A null value breaks the line (no data in that bucket).
 */
export function lineChart(host, opts) {
  const { svg, plotW, plotH } = frame(host, "line");
  const g = svgEl("g", { transform: `translate(${MARGIN.left},${MARGIN.top})` }, svg);
  const n = opts.labels.length;
  const all = opts.series.flatMap((s) => s.values.filter((v) => v != null));
  const maxData = Math.max(0, ...all, opts.threshold && opts.threshold.showAlways ? opts.threshold.value : 0);
  const ticks = niceTicks(maxData);
  const maxY = ticks[ticks.length - 1];
  const y = (v) => plotH - (v / maxY) * plotH;
  const x = (i) => (n <= 1 ? plotW / 2 : (i / (n - 1)) * plotW);
  yAxis(g, ticks, y, plotW, opts.format);
  xLabels(g, opts.labels, x, plotH, plotW);
  thresholdLine(g, opts.threshold, y, plotW, maxY);
  const tips = opts.tooltipLabels || opts.labels;
  for (const s of opts.series) {
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v == null) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) {
      svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round", class: "line", "data-series": s.name }, g);
    }
    // Points: visible when sparse, invisible hover targets when dense.
    const r = n > 60 ? 2 : 3;
    s.values.forEach((v, i) => {
      if (v == null) return;
      const c = svgEl("circle", {
        cx: x(i).toFixed(1), cy: y(v).toFixed(1), r, fill: s.color,
        class: n > 60 ? "mark dot dense" : "mark dot",
        "data-series": s.name, "data-label": tips[i], "data-value": v,
      }, g);
      titled(c, `${s.name} · ${tips[i]}: ${opts.format(v)}`);
    });
  }
  legend(host, opts.series);
}

/**
 * Vertical bar chart over categories; several series are grouped side by side, or stacked.
 * opts: { labels, tooltipLabels?, series: [{name, color, values}], format, stacked?, threshold? }
 */
export function barChart(host, opts) {
  const { svg, plotW, plotH } = frame(host, opts.stacked ? "stacked-bar" : "bar");
  const g = svgEl("g", { transform: `translate(${MARGIN.left},${MARGIN.top})` }, svg);
  const n = opts.labels.length;
  const sums = opts.labels.map((_, i) =>
    opts.stacked
      ? opts.series.reduce((a, s) => a + (s.values[i] || 0), 0)
      : Math.max(0, ...opts.series.map((s) => s.values[i] || 0)));
  const ticks = niceTicks(Math.max(0, ...sums));
  const maxY = ticks[ticks.length - 1];
  const y = (v) => plotH - (v / maxY) * plotH;
  const band = plotW / Math.max(1, n);
  const gap = Math.min(band * 0.25, 10);
  const xCenter = (i) => band * i + band / 2;
  yAxis(g, ticks, y, plotW, opts.format);
  xLabels(g, opts.labels, xCenter, plotH, plotW);
  const tips = opts.tooltipLabels || opts.labels;
  const groupW = band - gap;
  const barW = opts.stacked ? groupW : groupW / opts.series.length;
  for (let i = 0; i < n; i++) {
    let base = 0;
    opts.series.forEach((s, k) => {
      const v = s.values[i] || 0;
      const x0 = band * i + gap / 2 + (opts.stacked ? 0 : k * barW);
      const top = opts.stacked ? base + v : v;
      const h = Math.max(0, y(opts.stacked ? base : 0) - y(top));
      const rect = svgEl("rect", {
        x: x0.toFixed(1), y: y(top).toFixed(1), width: Math.max(1, barW - (opts.stacked ? 0 : 1)).toFixed(1),
        height: h.toFixed(1), rx: Math.min(3, barW / 4), fill: s.color, class: "mark bar",
        "data-series": s.name, "data-label": tips[i], "data-value": v,
      }, g);
      titled(rect, `${s.name} · ${tips[i]}: ${opts.format(v)}`);
      if (opts.stacked) base += v;
    });
  }
  thresholdLine(g, opts.threshold, y, plotW, maxY);
  legend(host, opts.series);
}

/**
 * Horizontal bars for ranked categories (by process, model, caller...).
 * opts: { rows: [{label, value, note?}], format, color, series }
 */
export function hbarChart(host, opts) {
  host.replaceChildren();
  const rows = opts.rows;
  const width = Math.max(280, Math.floor(host.clientWidth || 560));
  const rowH = 30;
  const labelW = Math.min(170, Math.floor(width * 0.34));
  const valueW = 84;
  const height = rows.length * rowH + 8;
  const svg = svgEl("svg", {
    viewBox: `0 0 ${width} ${height}`, width: "100%", height, role: "img", class: "chart", "data-chart": "hbar",
  }, host);
  const max = Math.max(0, ...rows.map((r) => r.value)) || 1;
  const plotW = width - labelW - valueW - 8;
  rows.forEach((r, i) => {
    const yy = 4 + i * rowH;
    const label = svgEl("text", { x: labelW - 10, y: yy + rowH / 2 + 4, "text-anchor": "end", class: "cat" }, svg);
    label.textContent = r.label.length > 24 ? `${r.label.slice(0, 23)}…` : r.label;
    titled(label, r.label);
    svgEl("rect", { x: labelW, y: yy + 6, width: plotW, height: rowH - 12, rx: 4, class: "track" }, svg);
    const w = Math.max(2, (r.value / max) * plotW);
    const color = r.color || opts.color || PALETTE[i % PALETTE.length];
    const bar = svgEl("rect", {
      x: labelW, y: yy + 6, width: w.toFixed(1), height: rowH - 12, rx: 4, fill: color, class: "mark bar",
      "data-series": opts.series || "value", "data-label": r.label, "data-value": r.value,
    }, svg);
    titled(bar, `${r.label}: ${opts.format(r.value)}${r.note ? ` (${r.note})` : ""}`);
    const v = svgEl("text", { x: labelW + plotW + 8, y: yy + rowH / 2 + 4, class: "value" }, svg);
    v.textContent = opts.format(r.value);
  });
}
