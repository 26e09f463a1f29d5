// Server: readiness from /health and small live charts from /metrics, sampled once a second while
// the tab is visible. A series appears only when the server exports its metric (the prefix-cache
// hit rate, for one, lights up once vllm:prefix_cache_hits_total does).

import { ApiError, metrics, show, total } from "./api.js";
import { lineChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 1000;
const KEEP = 120; // samples per chart: two minutes

// [id, title, unit, value(families, previous families, seconds between them) or null when not exported]
const rate = (name) => (now, before, dt) => {
  const a = total(now, name);
  const b = before ? total(before, name) : null;
  return a === null || b === null || dt <= 0 ? null : Math.max(0, (a - b) / dt);
};
const SERIES = [
  ["queue", "queue (waiting)", "", (m) => total(m, "vllm:num_requests_waiting")],
  ["running", "running rows", "", (m) => total(m, "vllm:num_requests_running")],
  ["kv", "KV cache use", "%", (m) => {
    const v = total(m, "vllm:kv_cache_usage_perc");
    return v === null ? null : 100 * v;
  }],
  ["tokens", "tokens generated / s", "", rate("reft_generation_tokens_total")],
  ["prefix", "prefix-cache hit rate", "%", (m, before) => {
    const hits = total(m, "vllm:prefix_cache_hits_total");
    const queries = total(m, "vllm:prefix_cache_queries_total");
    if (hits === null || queries === null || !before) return null;
    const dq = queries - (total(before, "vllm:prefix_cache_queries_total") ?? queries);
    const dh = hits - (total(before, "vllm:prefix_cache_hits_total") ?? hits);
    return dq > 0 ? (100 * dh) / dq : 0;
  }],
];

const history = new Map(SERIES.map(([id]) => [id, []]));
let previous = null;
let previousAt = 0;
let metricsRefusal = null;
const readinessListeners = [];

export function onReadiness(listener) {
  readinessListeners.push(listener);
}

async function readiness() {
  let status;
  let message;
  try {
    const resp = await fetch("/health", { cache: "no-store" });
    const body = await resp.json();
    status = resp.ok ? "ready" : body.status || "unavailable";
    message = body.error ? body.error.message : "";
  } catch {
    status = "unreachable";
    message = "the server does not answer";
  }
  $("server-ready").textContent = `readiness: ${status}${message ? ` (${message})` : ""}`;
  $("server-ready").dataset.status = status;
  for (const listener of readinessListeners) listener(status, message);
  return status;
}

function render() {
  const charts = $("charts");
  for (const [id, title, unit] of SERIES) {
    const points = history.get(id);
    let box = document.getElementById(`chart-${id}`);
    if (!points.length) {
      if (box) box.remove();
      continue;
    }
    if (!box) {
      box = document.createElement("div");
      box.id = `chart-${id}`;
      box.className = "chart card";
      charts.append(box);
    }
    lineChart(box, points, { title, unit, yMax: unit === "%" ? 100 : 1 });
  }
}

let sampling = false; // a slow server must not pile samples up

async function sample() {
  if (document.hidden || sampling) return;
  sampling = true;
  try {
    await sampleOnce();
  } finally {
    sampling = false;
  }
}

async function sampleOnce() {
  const status = await readiness();
  if (status !== "ready" || metricsRefusal) return;
  let m;
  try {
    m = await metrics();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      metricsRefusal = err.message;
      show($("server-message"), `${err.message} (set it under Keys)`);
    }
    return;
  }
  const at = performance.now() / 1000;
  for (const [id, , , value] of SERIES) {
    const v = value(m, previous, at - previousAt);
    const points = history.get(id);
    if (v === null || !Number.isFinite(v)) continue;
    points.push([at, v]);
    if (points.length > KEEP) points.shift();
  }
  previous = m;
  previousAt = at;
  render();
}

/** Keys changed: /metrics may answer now. */
export function retryMetrics() {
  metricsRefusal = null;
  show($("server-message"), "");
}

export function initMonitor() {
  sample();
  setInterval(sample, PERIOD_MS);
}
