// Keyvex admin dashboard: asks for an admin key (kept in sessionStorage only), reads the admin
// API (/v1/admin/metrics, /v1/admin/alerts, /v1/admin/models) for the chosen range and draws
// four tabs under a line naming the model catalog version in force and since when.
// Errors never blank the page: a bad key shows why, a failed refresh keeps the last data.

import { PALETTE, barChart, emptyState, hbarChart, lineChart } from "./charts.js";

const KEY_STORAGE = "keyvex.adminKey";
const REFRESH_MS = 15_000;
const OPEN_ALERT_MS = 3_600_000;
const RANGES = { "1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000, "30d": 30 * 86_400_000 };
const BUCKET_MS = { minute: 60_000, hour: 3_600_000, day: 86_400_000 };
const PROCESS_NAMES = {
  magicSpark: "Magic Spark", logicArchitect: "Logic Architect",
  contentCrafter: "Content Crafter", styleMaster: "Style Master",
};
const C = { p50: PALETTE[0], p95: PALETTE[1], p99: PALETTE[3], input: PALETTE[0], cached: PALETTE[4], output: PALETTE[1] };
const NO_DATA = "No requests in this range.";

const $ = (id) => document.getElementById(id);

const state = {
  tab: "cost",
  range: "24h",
  custom: null, // { from, to } in epoch ms
  data: null,
  loadedAt: null,
  generation: 0,
  timer: null,
};

// ---------------------------------------------------------------- formatting

const nf = new Intl.NumberFormat("en-US");
function usd(v) {
  if (v == null) return "–";
  if (v === 0) return "$0";
  if (Math.abs(v) >= 1000) return `$${nf.format(Math.round(v))}`;
  if (Math.abs(v) >= 0.1) return `$${v.toFixed(2)}`;
  if (Math.abs(v) >= 0.01) return `$${v.toFixed(3)}`;
  return `$${v.toPrecision(2)}`;
}
const microUsd = (m) => usd(m / 1e6);
function compact(v) {
  if (v == null) return "–";
  const a = Math.abs(v);
  if (a >= 1e9) return `${(v / 1e9).toFixed(a >= 1e10 ? 0 : 1)}B`;
  if (a >= 1e6) return `${(v / 1e6).toFixed(a >= 1e7 ? 0 : 1)}M`;
  if (a >= 1e3) return `${(v / 1e3).toFixed(a >= 1e4 ? 0 : 1)}k`;
  return nf.format(Math.round(v * 100) / 100);
}
function ms(v) {
  if (v == null) return "–";
  if (v >= 10_000) return `${(v / 1000).toFixed(0)} s`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)} s`;
  return `${Math.round(v)} ms`;
}
const pct = (r) => (r == null ? "–" : `${(r * 100).toFixed(r > 0 && r < 0.1 ? 1 : 0)}%`);
const processName = (k) => PROCESS_NAMES[k] || k;
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
function dateTime(msSinceEpoch) {
  const d = new Date(msSinceEpoch);
  return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
}

// ---------------------------------------------------------------- time buckets

function currentRange() {
  if (state.range === "custom" && state.custom) return { ...state.custom };
  const to = Date.now();
  return { from: to - RANGES[state.range], to };
}

function bucketFor(span) {
  if (span <= 3 * 3_600_000) return "minute";
  if (span <= 3 * 86_400_000) return "hour";
  return "day";
}

/** Every bucket key of the range, in order, in the API's spelling (UTC). */
function bucketKeys(from, to, bucket) {
  const step = BUCKET_MS[bucket];
  const cut = { minute: 16, hour: 13, day: 10 }[bucket];
  const keys = [];
  for (let t = Math.floor(from / step) * step; t <= to; t += step) {
    keys.push(new Date(t).toISOString().slice(0, cut));
  }
  return keys;
}

/** Short axis label and long tooltip label of a UTC bucket key. */
function bucketLabel(key, bucket) {
  const mon = MONTHS[Number(key.slice(5, 7)) - 1];
  const day = `${mon} ${Number(key.slice(8, 10))}`;
  if (bucket === "day") return { short: day, long: `${day} (UTC day)` };
  const hm = bucket === "hour" ? `${key.slice(11, 13)}:00` : key.slice(11, 16);
  return { short: hm, long: `${day} ${hm} UTC` };
}

// ---------------------------------------------------------------- API

class AuthError extends Error {}
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, params) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) throw new AuthError("Enter an admin API key to open the dashboard.");
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null));
  let resp;
  try {
    resp = await fetch(`${path}?${qs}`, { headers: { Authorization: `Bearer ${key}`, Accept: "application/json" }, cache: "no-store" });
  } catch (e) {
    throw new ApiError(`the server could not be reached (${e.message})`, 0);
  }
  let body = null;
  try { body = await resp.json(); } catch { body = null; }
  const serverMessage = body && body.error && body.error.message;
  if (resp.status === 401) {
    throw new AuthError("Unknown key: the server does not recognise this API key. Check it for typos, or ask for a new admin key.");
  }
  if (resp.status === 403) {
    throw new AuthError("This key is not an admin key: it is valid but has the user role. The dashboard needs a key with the admin role.");
  }
  if (!resp.ok) {
    throw new ApiError(serverMessage ? `${resp.status}: ${serverMessage}` : `the server answered ${resp.status} ${resp.statusText}`, resp.status);
  }
  if (!body) throw new ApiError("the server sent a response that is not JSON", resp.status);
  return body;
}

async function loadAll() {
  const { from, to } = currentRange();
  const bucket = bucketFor(to - from);
  const filter = { process: $("filter-process").value, provider: $("filter-provider").value };
  const metrics = (groupBy, extra = {}) =>
    api("/v1/admin/metrics", { from: String(from), to: String(to), groupBy, ...filter, ...extra });
  const todayStart = Math.floor(Date.now() / 86_400_000) * 86_400_000;
  const [series, byProcess, byProvider, byModel, byUser, today, alerts, models, notable] = await Promise.all([
    metrics(bucket),
    metrics("process"),
    metrics("provider"),
    metrics("model"),
    metrics("user"),
    // Today's spend is compared with the global daily alert, so it ignores the filters.
    api("/v1/admin/metrics", { from: String(todayStart), to: String(Date.now()) }),
    api("/v1/admin/alerts", { from: String(from), to: String(to) }),
    // A server without catalog versions still shows its metrics.
    api("/v1/admin/models", {}).catch((e) => { if (e instanceof AuthError) throw e; return null; }),
    // An older server without the endpoint still shows everything else.
    api("/v1/admin/requests/notable", { from: String(from), to: String(to), ...filter }).catch((e) => { if (e instanceof AuthError) throw e; return null; }),
  ]);
  // Spend against budget; a budget store that cannot answer (Redis down) leaves the rest shown.
  const budgets = await api("/v1/admin/budgets", {}).catch((e) => { if (e instanceof AuthError) throw e; return null; });
  return { from, to, bucket, series, byProcess, byProvider, byModel, byUser, today, alerts: alerts.alerts || [], models, notable, budgets };
}

// ---------------------------------------------------------------- refresh cycle

async function refresh() {
  const generation = ++state.generation;
  document.body.dataset.state = state.data ? "refreshing" : "loading";
  try {
    const data = await loadAll();
    if (generation !== state.generation) return; // a newer refresh superseded this one
    state.data = data;
    state.loadedAt = new Date();
    hideBanner();
    showView();
    render();
    document.body.dataset.state = "ready";
  } catch (e) {
    if (generation !== state.generation) return;
    if (e instanceof AuthError) {
      sessionStorage.removeItem(KEY_STORAGE);
      state.data = null;
      showLogin(e.message);
      document.body.dataset.state = "auth-error";
      return;
    }
    const kept = state.loadedAt ? ` Showing the data loaded at ${clock(state.loadedAt)}.` : "";
    const retry = $("auto-refresh").checked ? " Retrying automatically." : "";
    showBanner(`Could not refresh: ${e.message}.${kept}${retry}`);
    if (state.data) render();
    document.body.dataset.state = state.data ? "stale" : "error";
  }
}

function schedule() {
  clearInterval(state.timer);
  state.timer = null;
  if ($("auto-refresh").checked && sessionStorage.getItem(KEY_STORAGE)) {
    state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  }
}

function showBanner(text) { const b = $("banner"); b.textContent = text; b.hidden = false; }
function hideBanner() { $("banner").hidden = true; }

function showLogin(message) {
  $("view").hidden = true;
  $("controls").hidden = true;
  $("custom-range").hidden = true;
  $("login").hidden = false;
  hideBanner();
  const err = $("login-error");
  err.textContent = message || "";
  err.hidden = !message;
  $("api-key").value = "";
  $("api-key").focus();
  schedule();
}

function showView() {
  $("login").hidden = true;
  $("view").hidden = false;
  $("controls").hidden = false;
  $("custom-range").hidden = state.range !== "custom";
}

// ---------------------------------------------------------------- building blocks

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function kpi(label, value, sub, tone) {
  const card = el("div", `kpi card${tone ? ` ${tone}` : ""}`);
  card.append(el("div", "kpi-label", label), el("div", "kpi-value", value));
  if (sub) card.append(el("div", "kpi-sub", sub));
  return card;
}

/** A chart card; `draw(host)` is called after the card is in the page (so it has a width). */
function chartCard(title, subtitle, draw, wide) {
  const card = el("section", `card chart-card${wide ? " wide" : ""}`);
  const head = el("header", "card-head");
  head.append(el("h2", null, title));
  if (subtitle) head.append(el("span", "subtle", subtitle));
  const host = el("div", "chart-host");
  card.append(head, host);
  card._draw = () => draw(host);
  return card;
}

function mount(panel, blocks) {
  panel.replaceChildren(...blocks);
  for (const card of panel.querySelectorAll(".chart-card")) card._draw();
}

function grid(cards) { const g = el("div", "grid"); g.append(...cards); return g; }
function kpis(cards) { const g = el("div", "kpis"); g.append(...cards); return g; }

function series(d) {
  const keys = bucketKeys(d.from, d.to, d.bucket);
  const byKey = new Map(d.series.groups.map((g) => [g.key, g]));
  const rows = keys.map((k) => byKey.get(k) || null);
  const labels = keys.map((k) => bucketLabel(k, d.bucket));
  return { rows, labels: labels.map((l) => l.short), tips: labels.map((l) => l.long) };
}

const sortedBy = (groups, f) => [...groups].sort((a, b) => f(b) - f(a));
const hasData = (d) => d.series.totals.requests > 0;

function table(headers, rows, numericFrom = 1) {
  const t = el("table", "data");
  const tr = el("tr");
  headers.forEach((h, i) => tr.append(el("th", i >= numericFrom ? "num" : null, h)));
  const thead = el("thead"); thead.append(tr);
  const tbody = el("tbody");
  for (const r of rows) {
    const row = el("tr");
    r.forEach((c, i) => {
      const td = el("td", i >= numericFrom ? "num" : null);
      if (c instanceof Node) td.append(c); else td.textContent = c;
      row.append(td);
    });
    tbody.append(row);
  }
  t.append(thead, tbody);
  return t;
}

function tableCard(title, subtitle, tbl, wide) {
  const card = el("section", `card table-card${wide ? " wide" : ""}`);
  const head = el("header", "card-head");
  head.append(el("h2", null, title));
  if (subtitle) head.append(el("span", "subtle", subtitle));
  card.append(head, tbl);
  return card;
}

// ---------------------------------------------------------------- tabs

function renderCost(panel, d) {
  const t = d.series.totals;
  const th = d.today.thresholds || { costPerDayUsd: 100, costPerRequestUsd: 1 };
  const todaySpend = d.today.totals.costUsd;
  const share = th.costPerDayUsd > 0 ? todaySpend / th.costPerDayUsd : 0;
  const todayCard = kpi("Today's spend (UTC)", usd(todaySpend), `${pct(share)} of the ${usd(th.costPerDayUsd)} daily alert`, share >= 1 ? "bad" : share >= 0.8 ? "warn" : null);
  const meter = el("div", "meter");
  const fill = el("div", `meter-fill${share >= 1 ? " bad" : share >= 0.8 ? " warn" : ""}`);
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  meter.append(fill);
  todayCard.append(meter);
  const cpr = t.costPerRequestMicroUsd;
  const blocks = [kpis([
    kpi("Spend in range", usd(t.costUsd), `${nf.format(t.requests)} requests`),
    todayCard,
    kpi("Average per request", t.requests ? usd(t.costUsd / t.requests) : "–", `median ${microUsd(cpr.p50)}`),
    kpi("Most expensive request", microUsd(t.maxRequestCostMicroUsd), `p99 ${microUsd(cpr.p99)} · alert at ${usd(th.costPerRequestUsd)}`, t.maxRequestCostMicroUsd / 1e6 > th.costPerRequestUsd ? "warn" : null),
  ])];
  if (!hasData(d)) {
    blocks.push(grid([chartCard("Spend over time", null, (h) => emptyState(h, NO_DATA), true)]));
    return mount(panel, blocks);
  }
  const s = series(d);
  const unit = d.bucket === "day" ? "per day" : d.bucket === "hour" ? "per hour" : "per minute";
  blocks.push(grid([
    chartCard("Spend over time", `${unit}, UTC`, (h) => barChart(h, {
      labels: s.labels, tooltipLabels: s.tips, format: usd,
      series: [{ name: "Spend", color: PALETTE[0], values: s.rows.map((r) => (r ? r.costUsd : 0)) }],
      threshold: d.bucket === "day" ? { value: th.costPerDayUsd, label: `daily alert ${usd(th.costPerDayUsd)}` } : null,
    }), true),
    chartCard("Spend by process", null, (h) => hbarChart(h, {
      series: "Spend", format: usd,
      rows: sortedBy(d.byProcess.groups, (g) => g.costUsd).map((g) => ({ label: processName(g.key), value: g.costUsd, note: `${nf.format(g.requests)} requests` })),
    })),
    chartCard("Spend by provider", null, (h) => hbarChart(h, {
      series: "Spend", format: usd,
      rows: sortedBy(d.byProvider.groups, (g) => g.costUsd).map((g, i) => ({ label: g.key, value: g.costUsd, color: PALETTE[i === 0 ? 0 : 4] })),
    })),
    chartCard("Spend by model", null, (h) => hbarChart(h, {
      series: "Spend", format: usd,
      rows: sortedBy(d.byModel.groups, (g) => g.costUsd).map((g) => ({ label: g.key, value: g.costUsd, note: `${nf.format(g.requests)} requests` })),
    })),
    chartCard("Cost per request by process", "percentiles", (h) => barChart(h, {
      labels: d.byProcess.groups.map((g) => processName(g.key)), format: usd,
      series: ["p50", "p95", "p99"].map((p) => ({ name: p, color: C[p], values: d.byProcess.groups.map((g) => g.costPerRequestMicroUsd[p] / 1e6) })),
    })),
  ]));
  if (d.budgets) blocks.push(grid([budgetCard(d.budgets)]));
  mount(panel, blocks);
}

/// Spent (and held by calls in flight) against each limit, this UTC day and this month.
function budgetCard(b) {
  const cell = (line) => {
    if (!line) return "–";
    const spent = usd(line.spentUsd);
    const held = line.reservedUsd > 0 ? ` (+${usd(line.reservedUsd)} in flight)` : "";
    if (line.limitUsd == null) return `${spent}${held} · no limit`;
    const share = line.limitUsd > 0 ? (line.spentUsd + line.reservedUsd) / line.limitUsd : 1;
    const text = el("span", share >= 1 ? "bad" : share >= 0.8 ? "warn" : null, `${spent}${held} of ${usd(line.limitUsd)} (${pct(share)})`);
    return text;
  };
  const rows = [["all callers", cell(b.global), "–"]].concat(
    b.callers.map((c) => [c.caller, cell(c.day), cell(c.month)]));
  return tableCard("Spend against budget", `today and this month, UTC · ${b.store}`,
    table(["Caller", "Today", "This month"], rows), true);
}

function renderUsage(panel, d) {
  const t = d.series.totals;
  const blocks = [kpis([
    kpi("Requests", nf.format(t.requests), `${nf.format(t.errors)} failed (${nf.format(t.interrupted || 0)} interrupted) · ${nf.format(t.cancelled)} cancelled`),
    kpi("Input tokens", compact(t.inputTokens), `${pct(t.inputTokens ? t.cachedInputTokens / t.inputTokens : 0)} read from cache`),
    kpi("Cached input tokens", compact(t.cachedInputTokens)),
    kpi("Output tokens", compact(t.outputTokens), t.requests ? `${compact(Math.round(t.outputTokens / t.requests))} per request` : null),
  ])];
  if (!hasData(d)) {
    blocks.push(grid([chartCard("Requests over time", null, (h) => emptyState(h, NO_DATA), true)]));
    return mount(panel, blocks);
  }
  const s = series(d);
  const users = sortedBy(d.byUser.groups, (g) => g.requests).slice(0, 10);
  blocks.push(grid([
    chartCard("Requests over time", "UTC", (h) => barChart(h, {
      labels: s.labels, tooltipLabels: s.tips, format: compact, stacked: true,
      series: [
        { name: "Succeeded", color: PALETTE[2], values: s.rows.map((r) => (r ? r.requests - r.errors - r.cancelled : 0)) },
        { name: "Failed", color: PALETTE[3], values: s.rows.map((r) => (r ? r.errors - (r.interrupted || 0) : 0)) },
        { name: "Interrupted", color: PALETTE[5], values: s.rows.map((r) => (r ? r.interrupted || 0 : 0)) },
        { name: "Cancelled", color: PALETTE[9], values: s.rows.map((r) => (r ? r.cancelled : 0)) },
      ],
    }), true),
    chartCard("Tokens over time", "UTC", (h) => lineChart(h, {
      labels: s.labels, tooltipLabels: s.tips, format: compact,
      series: [
        { name: "Input", color: C.input, values: s.rows.map((r) => (r ? r.inputTokens : 0)) },
        { name: "Cached input", color: C.cached, values: s.rows.map((r) => (r ? r.cachedInputTokens : 0)) },
        { name: "Output", color: C.output, values: s.rows.map((r) => (r ? r.outputTokens : 0)) },
      ],
    }), true),
    chartCard("Requests by process", null, (h) => hbarChart(h, {
      series: "Requests", format: compact,
      rows: sortedBy(d.byProcess.groups, (g) => g.requests).map((g) => ({ label: processName(g.key), value: g.requests })),
    })),
    chartCard("Tokens by model", "input · cached · output", (h) => barChart(h, {
      labels: d.byModel.groups.map((g) => g.key), format: compact,
      series: [
        { name: "Input", color: C.input, values: d.byModel.groups.map((g) => g.inputTokens) },
        { name: "Cached input", color: C.cached, values: d.byModel.groups.map((g) => g.cachedInputTokens) },
        { name: "Output", color: C.output, values: d.byModel.groups.map((g) => g.outputTokens) },
      ],
    })),
    chartCard("Top callers", "by requests", (h) => hbarChart(h, {
      series: "Requests", format: compact,
      rows: users.map((g) => ({ label: g.key, value: g.requests, note: usd(g.costUsd) })),
    })),
    tableCard("Top callers", "requests, tokens and spend", table(
      ["Caller", "Requests", "Tokens", "Spend", "Errors"],
      users.map((g) => [g.key, nf.format(g.requests), compact(g.inputTokens + g.outputTokens), usd(g.costUsd), pct(g.errorRate)]),
    )),
  ]));
  mount(panel, blocks);
}

function renderPerformance(panel, d) {
  const t = d.series.totals;
  const th = d.series.thresholds || { errorRate: 0.05, avgLatencyMs: 5000 };
  const blocks = [kpis([
    kpi("Latency p50 / p95", `${ms(t.latencyMs.p50)} / ${ms(t.latencyMs.p95)}`, `p99 ${ms(t.latencyMs.p99)}`),
    kpi("Time to first token p50 / p95", t.ttftMs ? `${ms(t.ttftMs.p50)} / ${ms(t.ttftMs.p95)}` : "–", t.ttftMs ? `p99 ${ms(t.ttftMs.p99)}` : "no request reported a TTFT"),
    kpi("Error rate", pct(t.errorRate), `${nf.format(t.errors)} of ${nf.format(t.requests)} · alert at ${pct(th.errorRate)}`, t.errorRate > th.errorRate ? "bad" : null),
    kpi("Fallback rate", pct(t.fallbackRate), `${nf.format(t.fallbacks)} requests answered by the fallback model`),
  ])];
  const cards = [];
  if (!hasData(d)) {
    cards.push(chartCard("Latency over time", null, (h) => emptyState(h, NO_DATA), true));
  } else {
    const s = series(d);
    const pctSeries = (f) => ["p50", "p95", "p99"].map((p) => ({ name: p, color: C[p], values: s.rows.map((r) => (r && f(r) ? f(r)[p] : null)) }));
    cards.push(
      chartCard("Latency over time", "end to end, UTC", (h) => lineChart(h, { labels: s.labels, tooltipLabels: s.tips, format: ms, series: pctSeries((r) => r.latencyMs) }), true),
      chartCard("Time to first token over time", "UTC", (h) => lineChart(h, { labels: s.labels, tooltipLabels: s.tips, format: ms, series: pctSeries((r) => r.ttftMs) }), true),
      chartCard("Error and fallback rate", "UTC", (h) => lineChart(h, {
        labels: s.labels, tooltipLabels: s.tips, format: pct,
        threshold: { value: th.errorRate, label: `error alert ${pct(th.errorRate)}`, showAlways: true },
        series: [
          { name: "Error rate", color: PALETTE[3], values: s.rows.map((r) => (r ? r.errorRate : null)) },
          { name: "Fallback rate", color: PALETTE[5], values: s.rows.map((r) => (r ? r.fallbackRate : null)) },
        ],
      }), true),
      chartCard("Latency by process", "percentiles", (h) => barChart(h, {
        labels: d.byProcess.groups.map((g) => processName(g.key)), format: ms,
        series: ["p50", "p95", "p99"].map((p) => ({ name: p, color: C[p], values: d.byProcess.groups.map((g) => g.latencyMs[p]) })),
      })),
      chartCard("Latency by provider", "percentiles", (h) => barChart(h, {
        labels: d.byProvider.groups.map((g) => g.key), format: ms,
        series: ["p50", "p95", "p99"].map((p) => ({ name: p, color: C[p], values: d.byProvider.groups.map((g) => g.latencyMs[p]) })),
      })),
      // A stream that broke mid-answer and was finished by another call, on the model that finished it.
      chartCard("Rescued calls by model", "answers finished after a stream broke mid-answer", (h) => hbarChart(h, {
        series: "Rescued", format: (v) => nf.format(v),
        rows: sortedBy(d.byModel.groups, (g) => g.rescued || 0).map((g) => ({ label: g.key, value: g.rescued || 0, note: `of ${nf.format(g.requests)} requests` })),
      })),
    );
  }
  cards.push(pipelineCard(d.series.pipeline));
  if (d.notable) {
    cards.push(notableCard("Slowest requests", "end-to-end latency, with the trace to open", d.notable.slowest));
    cards.push(notableCard("Failed requests", "newest first, with the trace to open", d.notable.failed));
  }
  blocks.push(grid(cards));
  mount(panel, blocks);
}

// A request's trace id, selectable and with a copy button: paste it into the tracing backend.
function traceCell(traceId) {
  if (!traceId) return el("span", "subtle", "not traced");
  const wrap = el("span", "trace-id");
  const code = el("code", null, traceId);
  code.title = "OpenTelemetry trace id";
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.dataset.traceId = traceId;
  copy.setAttribute("aria-label", `Copy trace id ${traceId}`);
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(traceId);
      copy.textContent = "Copied";
    } catch {
      // No clipboard (plain HTTP, permissions): select the id so Ctrl+C copies it.
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      copy.textContent = "Selected";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  wrap.append(code, copy);
  return wrap;
}

function notableCard(title, subtitle, list) {
  if (!list || list.length === 0) {
    return tableCard(title, subtitle, el("p", "empty", "None in this range."), true);
  }
  const rows = list.map((r) => [
    r.at.replace("T", " ").replace(/\.\d+Z$/, "Z"),
    processName(r.process),
    r.model,
    r.errorKind ? `${r.status} (${r.errorKind})` : r.status,
    ms(r.latencyMs),
    traceCell(r.traceId),
  ]);
  const card = tableCard(title, subtitle, table(["Started", "Process", "Model", "Status", "Latency", "Trace id"], rows, 4), true);
  card.dataset.notable = title;
  return card;
}

function pipelineCard(p) {
  if (!p) {
    const card = tableCard("Metrics pipeline", null, el("p", "empty", "This server does not report the metrics pipeline's health."));
    return card;
  }
  const behind = p.pending > 0 && (p.oldestPendingAgeMs || 0) > 60_000;
  const status = el("span", `pill ${p.failedWrites > 0 || behind ? "warn" : "ok"}`, behind ? "behind" : p.failedWrites > 0 ? "retrying" : "healthy");
  const rows = [
    ["Sink", p.sink],
    ["Pending in ledger", nf.format(p.pending)],
    ["Oldest pending", p.oldestPendingAgeMs == null ? "–" : ms(p.oldestPendingAgeMs)],
    ["Shipped", nf.format(p.shipped)],
    ["Retried writes", nf.format(p.retried)],
    ["Failed writes", nf.format(p.failedWrites)],
    ["Accepted / durable", `${nf.format(p.accepted)} / ${nf.format(p.durable)}`],
    ["Ledger commits / errors", `${nf.format(p.ledgerCommits)} / ${nf.format(p.ledgerErrors)}`],
    ["Alerts raised", nf.format(p.alertsRaised)],
    ["Calls recorded as interrupted", `${nf.format(p.recovered || 0)} after a stop here · ${nf.format(p.swept || 0)} of lost replicas`],
  ];
  const card = tableCard("Metrics pipeline", "since this server started", table(["", ""], rows));
  card.querySelector(".card-head").append(status);
  card.querySelector("thead").remove();
  return card;
}

function renderAlerts(panel, d) {
  const now = Date.now();
  const alerts = d.alerts;
  const open = alerts.filter((a) => now - a.timestampMs <= OPEN_ALERT_MS);
  const critical = alerts.filter((a) => a.severity === "critical").length;
  const blocks = [kpis([
    kpi("Open (last hour)", nf.format(open.length), "raised in the last 60 minutes", open.length ? "bad" : null),
    kpi("Raised in range", nf.format(alerts.length)),
    kpi("Critical", nf.format(critical), "cost per day, error rate, catalog load", critical ? "bad" : null),
    kpi("Warning", nf.format(alerts.length - critical), "cost per request, latency"),
  ])];
  const cards = [];
  if (alerts.length === 0) {
    cards.push(tableCard("Alerts", null, el("p", "empty", "No alerts in this range."), true));
  } else {
    const keys = bucketKeys(d.from, d.to, d.bucket);
    const cut = { minute: 16, hour: 13, day: 10 }[d.bucket];
    const count = (sev) => keys.map((k) => alerts.filter((a) => a.severity === sev && new Date(a.timestampMs).toISOString().slice(0, cut) === k).length);
    const labels = keys.map((k) => bucketLabel(k, d.bucket));
    cards.push(chartCard("Alerts over time", "UTC", (h) => barChart(h, {
      labels: labels.map((l) => l.short), tooltipLabels: labels.map((l) => l.long), format: compact, stacked: true,
      series: [
        { name: "Critical", color: PALETTE[3], values: count("critical") },
        { name: "Warning", color: PALETTE[6], values: count("warning") },
      ],
    }), true));
    // A catalog_load alert's figures are versions: the one refused and the one kept.
    const fmt = (a, v) => (a.alertType.startsWith("cost") ? usd(v) : a.alertType === "error_rate" ? pct(v) : a.alertType === "catalog_load" ? `version ${v}` : ms(v));
    const value = (a) => fmt(a, a.observed);
    const limit = (a) => fmt(a, a.threshold);
    const rows = alerts.map((a) => {
      const sev = el("span", `pill ${a.severity === "critical" ? "bad" : "warn"}`, a.severity);
      const when = el("span", null, dateTime(a.timestampMs));
      if (now - a.timestampMs <= OPEN_ALERT_MS) when.append(el("span", "pill open", "open"));
      return [when, sev, a.alertType.replaceAll("_", " "), value(a), limit(a), a.message];
    });
    const tbl = table(["Raised", "Severity", "Type", "Value", "Threshold", "Message"], rows, 3);
    tbl.id = "alerts-table";
    for (const [i, tr] of [...tbl.querySelectorAll("tbody tr")].entries()) {
      tr.dataset.alertType = alerts[i].alertType;
      tr.dataset.severity = alerts[i].severity;
    }
    tbl.querySelectorAll("tbody td:last-child").forEach((td) => td.classList.add("message"));
    cards.push(tableCard("Open and recent alerts", "newest first", tbl, true));
  }
  blocks.push(grid(cards));
  mount(panel, blocks);
}

const RENDERERS = { cost: renderCost, usage: renderUsage, performance: renderPerformance, alerts: renderAlerts };

/** The catalog version this server routes and prices with, and since when. */
function catalogLine(m) {
  if (!m) return "Model catalog: this server does not report its versions.";
  const l = m.loaded;
  const since = l.activatedAtMs ? `active since ${dateTime(l.activatedAtMs)}` : "the built-in catalog, in force since this server started";
  const stored = m.active && m.active.version !== l.version ? ` · the store has version ${m.active.version} active` : "";
  const refused = l.refused ? ` · version ${l.refused.version} could not be loaded here (see Alerts)` : "";
  return `Model catalog version ${l.version} (${l.label}) · ${since}${stored}${refused}`;
}

function render() {
  const d = state.data;
  if (!d) return;
  const badge = $("alert-count");
  const open = d.alerts.filter((a) => Date.now() - a.timestampMs <= OPEN_ALERT_MS).length;
  badge.textContent = String(d.alerts.length);
  badge.hidden = d.alerts.length === 0;
  badge.classList.toggle("hot", open > 0);
  const filters = [$("filter-process").value && processName($("filter-process").value), $("filter-provider").value].filter(Boolean);
  $("status-line").textContent = `${dateTime(d.from)} – ${dateTime(d.to)} · ${d.bucket} buckets (UTC)` +
    `${filters.length ? ` · only ${filters.join(", ")}` : ""} · updated ${clock(state.loadedAt)}`;
  const catalog = $("catalog-line");
  catalog.textContent = catalogLine(d.models);
  if (d.models) catalog.dataset.version = String(d.models.loaded.version);
  for (const tab of Object.keys(RENDERERS)) {
    const panel = $(`panel-${tab}`);
    panel.hidden = tab !== state.tab;
    // Only the visible panel is drawn: hidden panels have no width to lay charts out in.
    if (tab === state.tab) RENDERERS[tab](panel, d);
  }
}

// ---------------------------------------------------------------- wiring

function selectTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("[data-tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  history.replaceState(null, "", `#${tab}`);
  render();
}

function toLocalInput(msSinceEpoch) {
  const d = new Date(msSinceEpoch - new Date(msSinceEpoch).getTimezoneOffset() * 60_000);
  return d.toISOString().slice(0, 16);
}

function init() {
  for (const b of document.querySelectorAll("[data-tab]")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  const fromHash = location.hash.slice(1);
  if (RENDERERS[fromHash]) selectTab(fromHash);

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login-error").hidden = true;
    refresh().then(schedule);
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    state.data = null;
    state.generation++;
    showLogin(null);
    document.body.dataset.state = "signed-out";
  });
  $("refresh").addEventListener("click", refresh);
  $("auto-refresh").addEventListener("change", schedule);
  for (const id of ["filter-process", "filter-provider"]) $(id).addEventListener("change", refresh);
  $("range").addEventListener("change", () => {
    state.range = $("range").value;
    if (state.range === "custom") {
      const { from, to } = state.custom || { from: Date.now() - RANGES["24h"], to: Date.now() };
      $("custom-from").value = toLocalInput(from);
      $("custom-to").value = toLocalInput(to);
      $("custom-range").hidden = false;
      return;
    }
    $("custom-range").hidden = true;
    refresh();
  });
  $("custom-range").addEventListener("submit", (e) => {
    e.preventDefault();
    const from = new Date($("custom-from").value).getTime();
    const to = new Date($("custom-to").value).getTime();
    if (!(from < to)) { showBanner("The custom range needs a start before its end."); return; }
    state.custom = { from, to };
    refresh();
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 150); });

  if (sessionStorage.getItem(KEY_STORAGE)) refresh().then(schedule);
  else { showLogin(null); document.body.dataset.state = "signed-out"; }
}

init();
