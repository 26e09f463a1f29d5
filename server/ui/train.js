// Train: examples (JSONL pasted or picked, plus rows typed in a small table) and the options
// POST /v1/adapters/train takes; the job is then followed with GET until it ends, its loss drawn per step.

import { json, request, show } from "./api.js";
import { lineChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const DONE = new Set(["succeeded", "failed", "cancelled"]);
let job = null; // the job being followed
let onDone = () => {};

function addRow(prompt = "", completion = "") {
  const n = $("train-rows").tBodies[0].rows.length + 1;
  const tr = document.createElement("tr");
  for (const [field, value] of [["prompt", prompt], ["completion", completion]]) {
    const input = document.createElement("input");
    input.className = `row-${field}`;
    input.value = value;
    input.setAttribute("aria-label", `Row ${n} ${field}`);
    input.addEventListener("input", count);
    const td = document.createElement("td");
    td.append(input);
    tr.append(td);
  }
  $("train-rows").tBodies[0].append(tr);
  return tr;
}

/** The examples the form holds, or an Error naming the first bad JSONL line. */
function examples() {
  const rows = [];
  const lines = $("train-jsonl").value.split("\n");
  for (const [i, line] of lines.entries()) {
    if (!line.trim()) continue;
    let row;
    try {
      row = JSON.parse(line);
    } catch (err) {
      throw new Error(`JSONL line ${i + 1}: ${err.message}`);
    }
    if (row === null || typeof row !== "object" || Array.isArray(row)) {
      throw new Error(`JSONL line ${i + 1}: an example is a JSON object`);
    }
    rows.push(row);
  }
  for (const tr of $("train-rows").tBodies[0].rows) {
    const prompt = tr.querySelector(".row-prompt").value;
    const completion = tr.querySelector(".row-completion").value;
    if (prompt.trim() || completion.trim()) rows.push({ prompt, completion });
  }
  return rows;
}

function count() {
  try {
    const n = examples().length;
    $("train-count").textContent = `${n} example${n === 1 ? "" : "s"}`;
  } catch (err) {
    $("train-count").textContent = err.message;
  }
}

function options(data) {
  const body = {
    name: $("train-name").value.trim(),
    data,
    type: $("train-type").value,
    positions: $("train-positions").value.trim(),
    share_weights: $("train-share").checked,
    rank: Number($("train-rank").value),
    epochs: Number($("train-epochs").value),
    lr: Number($("train-lr").value),
    batch_size: Number($("train-batch").value),
    seed: Number($("train-seed").value),
    replace: $("train-replace").checked,
  };
  const layers = $("train-layers").value.trim();
  if (layers) body.layers = layers.split(/[\s,]+/).filter(Boolean).map(Number);
  return body;
}

function draw(points, steps) {
  lineChart($("loss-chart"), points, { title: "training loss per step", xMin: 0, xMax: steps, fitY: true,
                                       width: 420, height: 180 });
}

function describe(j) {
  const parts = [j.status, `epoch ${j.epoch}/${j.epochs}`, `step ${j.step}/${j.steps}`];
  if (j.loss !== null && j.loss !== undefined) parts.push(`loss ${j.loss.toFixed(4)}`);
  return `${j.name}: ${parts.join(" · ")}`;
}

async function follow(started) {
  const points = [];
  job = started;
  $("train-cancel").disabled = false;
  $("train-compare").hidden = true;
  let j = started;
  for (;;) {
    if (j.loss !== null && j.loss !== undefined && (!points.length || points.at(-1)[0] !== j.step)) {
      points.push([j.step, j.loss]);
    }
    $("train-status").textContent = describe(j);
    $("train-status").dataset.status = j.status;
    draw(points, j.steps);
    if (DONE.has(j.status)) break;
    await new Promise((r) => setTimeout(r, POLL_MS));
    try {
      j = await json(`/v1/adapters/train/${encodeURIComponent(j.id)}`, { admin: true });
    } catch (err) {
      show($("train-message"), err.message);
      break;
    }
  }
  job = null;
  $("train-cancel").disabled = true;
  $("train-start").disabled = false;
  if (j.status === "succeeded") {
    $("train-compare").hidden = false;
    $("train-compare").dataset.adapter = j.name;
    show($("train-message"), `registered ${j.name} (version ${j.adapter.version})`, "ok");
    onDone(j.name);
  } else if (j.status === "failed") {
    show($("train-message"), j.error || "the job failed");
  }
}

async function start(event) {
  event.preventDefault();
  show($("train-message"), "");
  let data;
  try {
    data = examples();
    if (!data.length) throw new Error("no examples: paste JSONL, pick a file or fill a row");
  } catch (err) {
    show($("train-message"), err.message);
    return;
  }
  $("train-start").disabled = true;
  try {
    const started = await json("/v1/adapters/train", { method: "POST", body: options(data), admin: true });
    await follow(started);
  } catch (err) {
    show($("train-message"), err.message);
    $("train-start").disabled = false;
  }
}

async function cancel() {
  if (!job) return;
  try {
    await request(`/v1/adapters/train/${encodeURIComponent(job.id)}`, { method: "DELETE", admin: true });
  } catch (err) {
    show($("train-message"), err.message);
  }
}

export function initTrain({ done, compare }) {
  onDone = done;
  for (let i = 0; i < 3; i++) addRow();
  $("train-add-row").addEventListener("click", () => addRow().querySelector("input").focus());
  $("train-jsonl").addEventListener("input", count);
  $("train-file").addEventListener("change", async () => {
    const file = $("train-file").files[0];
    if (!file) return;
    $("train-jsonl").value = await file.text();
    count();
  });
  $("train-form").addEventListener("submit", start);
  $("train-cancel").addEventListener("click", cancel);
  $("train-compare").addEventListener("click", () => compare($("train-compare").dataset.adapter));
  count();
  draw([], 1);
}
