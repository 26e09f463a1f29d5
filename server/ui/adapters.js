// Adapters: the registry page by page as GET /v1/adapters gives it (limit/after), a filter that
// reads on through the pages until a page of matches is found, upload (file picker or drop),
// replace and delete. Residency comes from /metrics' vllm:lora_adapter_loaded where the server exports it.

import { el, json, metrics, request, show } from "./api.js";

const $ = (id) => document.getElementById(id);
const SCAN_LIMIT = 200; // names read per request while filtering
const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;
const state = { after: null, history: [], next: null };
let onChange = () => {};

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function matches(a, needle) {
  return [a.name, a.positions, ...a.types].some((s) => s.toLowerCase().includes(needle));
}

/** One page: `limit` adapters (matching the filter) after `after`, and the cursor of the next page. */
async function fetchPage(after, limit, needle) {
  if (!needle) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (after) q.set("after", after);
    const page = await json(`/v1/adapters?${q}`);
    return { rows: page.data, next: page.has_more ? page.next_after : null };
  }
  const rows = [];
  let cursor = after;
  for (;;) {
    const q = new URLSearchParams({ limit: String(SCAN_LIMIT) });
    if (cursor) q.set("after", cursor);
    const page = await json(`/v1/adapters?${q}`);
    for (const a of page.data) {
      if (!matches(a, needle)) continue;
      rows.push(a);
      if (rows.length === limit) return { rows, next: a.name };
    }
    if (!page.has_more) return { rows, next: null };
    cursor = page.next_after;
  }
}

async function residency() {
  try {
    const loaded = (await metrics()).get("vllm:lora_adapter_loaded");
    if (!loaded) return null;
    const levels = new Map();
    for (const s of loaded) {
      if (s.value > 0) levels.set(s.labels.adapter_name, s.labels.level || "yes");
    }
    return levels;
  } catch {
    return null; // /metrics may need a key this page was not given: residency is then left blank
  }
}

function row(a, levels) {
  const resident = levels === null ? "–" : levels.get(a.name) || "no";
  const del = el("button", { type: "button", class: "secondary small-btn danger", text: "Delete",
                             "aria-label": `Delete ${a.name}` });
  del.addEventListener("click", () => confirmDelete(del, a.name));
  const replace = el("button", { type: "button", class: "secondary small-btn", text: "Replace",
                                 "aria-label": `Replace ${a.name}` });
  replace.addEventListener("click", () => {
    $("upload-name").value = a.name;
    delete $("upload-name").dataset.auto;
    $("upload-replace").checked = true;
    $("upload-file").focus();
  });
  return el("tr", { "data-name": a.name },
    el("th", { scope: "row", text: a.name }),
    el("td", { text: a.types.join(", ") }),
    el("td", { text: String(a.rank) }),
    el("td", { text: a.layers.join(", ") }),
    el("td", { text: a.positions + (a.share_weights ? " (shared)" : "") }),
    el("td", { text: size(a.bytes), title: `${a.bytes} bytes` }),
    el("td", { text: String(a.version) }),
    el("td", { text: a.sha256.slice(0, 12), title: a.sha256, class: "mono" }),
    el("td", { text: resident, title: levels === null ? "the server does not report residency" : "" }),
    el("td", { class: "actions" }, replace, del));
}

async function confirmDelete(button, name) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Delete";
    }, 4000);
    return;
  }
  try {
    await request(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE", admin: true });
    show($("adapters-message"), `deleted ${name}`, "ok");
    await load(state.after);
    onChange();
  } catch (err) {
    show($("adapters-message"), err.message);
  }
}

let loads = 0; // only the latest load may fill the table

export async function load(after = state.after) {
  const limit = Number($("page-size").value);
  const needle = $("adapter-filter").value.trim().toLowerCase();
  const mine = ++loads;
  try {
    const [page, levels] = await Promise.all([fetchPage(after, limit, needle), residency()]);
    if (mine !== loads) return;
    state.after = after;
    state.next = page.next;
    $("adapter-table").tBodies[0].replaceChildren(...page.rows.map((a) => row(a, levels)));
    if (!page.rows.length) {
      $("adapter-table").tBodies[0].append(el("tr", {}, el("td", { colspan: "10", class: "muted",
        text: needle ? "no adapter matches" : "no adapters" })));
    }
    $("page-prev").disabled = state.history.length === 0;
    $("page-next").disabled = state.next === null;
    $("page-info").textContent = `page ${state.history.length + 1} · ${page.rows.length} shown`;
  } catch (err) {
    show($("adapters-message"), err.message);
  }
}

function restart() {
  state.history = [];
  load(null);
}

function chooseFile(file) {
  const archive = ARCHIVE.test(file.name);
  $("upload-positions").disabled = !archive;
  $("upload-share").disabled = !archive;
  $("upload-positions").required = archive;
  const name = $("upload-name");
  // The name follows the file until the user types one.
  if (!name.value || name.dataset.auto) {
    name.value = file.name.replace(ARCHIVE, "").replace(/\.safetensors$/i, "");
    name.dataset.auto = "1";
  }
}

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  const form = new FormData();
  form.append("name", $("upload-name").value.trim());
  form.append("file", file, file.name);
  if (ARCHIVE.test(file.name)) {
    form.append("positions", $("upload-positions").value.trim());
    form.append("share_weights", $("upload-share").checked ? "true" : "false");
  }
  if ($("upload-replace").checked) form.append("replace", "true");
  $("upload-submit").disabled = true;
  try {
    const a = await json("/v1/adapters", { method: "POST", form, admin: true });
    show($("upload-message"), `uploaded ${a.name} (version ${a.version}, sha256 ${a.sha256.slice(0, 12)})`, "ok");
    $("upload-form").reset();
    restart();
    onChange();
  } catch (err) {
    show($("upload-message"), err.message);
  } finally {
    $("upload-submit").disabled = false;
  }
}

export function initAdapters(changed) {
  onChange = changed;
  let timer;
  $("adapter-filter").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(restart, 250);
  });
  $("page-size").addEventListener("change", restart);
  $("adapters-refresh").addEventListener("click", () => load());
  $("page-next").addEventListener("click", () => {
    state.history.push(state.after);
    load(state.next);
  });
  $("page-prev").addEventListener("click", () => load(state.history.pop() ?? null));
  $("upload-form").addEventListener("submit", upload);
  $("upload-name").addEventListener("input", () => delete $("upload-name").dataset.auto);
  $("upload-file").addEventListener("change", () => $("upload-file").files[0] && chooseFile($("upload-file").files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (!e.dataTransfer.files.length) return;
    $("upload-file").files = e.dataTransfer.files;
    chooseFile(e.dataTransfer.files[0]);
  });
}
