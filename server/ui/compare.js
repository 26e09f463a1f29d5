// Compare: one chat prompt through up to four models (base, an adapter, or a composition "a+b"),
// each column its own streamed /v1/chat/completions request, all sent at once so they share batches.

import { ApiError, el, events, json, request } from "./api.js";

const MAX_COLUMNS = 4;
const $ = (id) => document.getElementById(id);
let running = null; // the AbortController of the run in progress

function columns() {
  return [...$("columns").querySelectorAll(".column")];
}

function renumber() {
  const cols = columns();
  cols.forEach((col, i) => {
    col.setAttribute("aria-label", `Column ${i + 1}`);
    col.dataset.index = String(i);
    col.querySelector(".col-remove").disabled = cols.length === 1;
  });
  $("add-column").disabled = cols.length >= MAX_COLUMNS;
}

export function addColumn(model = "base") {
  if (columns().length >= MAX_COLUMNS) return null;
  const col = $("column-template").content.firstElementChild.cloneNode(true);
  col.querySelector(".col-model").value = model;
  col.querySelector(".col-remove").addEventListener("click", () => {
    col.remove();
    renumber();
  });
  $("columns").append(col);
  renumber();
  return col;
}

/** Put `model` in the last column (a new one while there is room) and bring Compare forward. */
export function useModel(model) {
  const col = addColumn(model) || columns().at(-1);
  col.querySelector(".col-model").value = model;
  return col;
}

export async function refreshModels() {
  const list = $("model-names");
  const models = await json("/v1/models");
  list.replaceChildren(el("option", { value: "base" }),
                       ...models.data.filter((m) => m.parent).map((m) => el("option", { value: m.id })));
  return models.data;
}

function messages() {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  out.push({ role: "user", content: $("user").value });
  return out;
}

function requestBody(col, msgs) {
  const body = {
    model: col.querySelector(".col-model").value.trim(),
    messages: msgs,
    temperature: Number(col.querySelector(".col-temp").value || 0),
    max_tokens: Number(col.querySelector(".col-max").value || 16),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = col.querySelector(".col-seed").value;
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function stats(col, parts) {
  col.querySelector(".col-stats").textContent = parts.filter(Boolean).join(" · ");
}

async function runColumn(col, body, signal) {
  const out = col.querySelector(".col-output");
  out.textContent = "";
  out.classList.remove("error");
  col.classList.add("busy");
  col.dataset.state = "running";
  const start = performance.now();
  let first = null;
  let text = "";
  let usage = null;
  let finish = null;
  stats(col, ["waiting…"]);
  try {
    const resp = await request("/v1/chat/completions", { method: "POST", body, signal });
    for await (const data of events(resp)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message, chunk.error.type);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (first === null) first = performance.now();
          text += choice.delta.content;
          out.textContent = text;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : null;
    const decodeSeconds = first === null ? 0 : (end - first) / 1000;
    const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : undefined;
    stats(col, [
      first === null ? "no tokens" : `TTFT ${Math.round(first - start)} ms`,
      tokens > 1 && decodeSeconds > 0 ? `${((tokens - 1) / decodeSeconds).toFixed(1)} tok/s` : "",
      tokens === null ? "" : `${tokens} tokens`,
      usage ? `prompt ${usage.prompt_tokens}` : "",
      cached === undefined ? "" : `cached ${cached}`,
      finish ? `finish: ${finish}` : "",
    ]);
    col.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      stats(col, ["stopped"]);
      col.dataset.state = "stopped";
    } else {
      out.textContent = err.message;
      out.classList.add("error");
      stats(col, [err.status ? `refused (${err.status})` : "failed"]);
      col.dataset.state = "error";
    }
  } finally {
    col.classList.remove("busy");
  }
}

async function runAll(event) {
  event.preventDefault();
  if (running) return;
  running = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  const msgs = messages();
  try {
    await Promise.all(columns().map((col) => runColumn(col, requestBody(col, msgs), running.signal)));
  } finally {
    running = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

export function initCompare(adapters) {
  $("compare-form").addEventListener("submit", runAll);
  $("compare-form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("compare-form").requestSubmit();
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("add-column").addEventListener("click", () => {
    const col = addColumn();
    if (col) col.querySelector(".col-model").focus();
  });
  for (const model of ["base", ...adapters.slice(0, 2)]) addColumn(model);
}
