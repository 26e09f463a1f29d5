// The playground's shell: tabs (arrow keys move between them), the key dialog, and the wiring
// between panels. Each panel lives in its own module and talks to the server only through api.js.

import { hooks, json, keys } from "./api.js";
import { load as loadAdapters, initAdapters } from "./adapters.js";
import { initCompare, refreshModels, useModel } from "./compare.js";
import { initMonitor, onReadiness, retryMetrics } from "./monitor.js";
import { initTrain } from "./train.js";

const $ = (id) => document.getElementById(id);
const TABS = ["compare", "adapters", "train", "server"];

function select(name, focus = false) {
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (name === "adapters") loadAdapters();
}

function initTabs() {
  TABS.forEach((t, i) => {
    const tab = $(`tab-${t}`);
    tab.addEventListener("click", () => select(t));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) select(TABS[(i + step + TABS.length) % TABS.length], true);
      else if (e.key === "Home") select(TABS[0], true);
      else if (e.key === "End") select(TABS.at(-1), true);
    });
  });
}

function askForKeys(reason = "") {
  const dialog = $("keys-dialog");
  $("key-api").value = keys.api;
  $("key-admin").value = keys.admin;
  $("keys-reason").textContent = reason;
  $("keys-reason").hidden = !reason;
  if (!dialog.open) dialog.showModal();
}

function initKeys(reload) {
  $("keys-open").addEventListener("click", () => askForKeys());
  $("keys-dialog").addEventListener("close", () => {
    if ($("keys-dialog").returnValue !== "save") return;
    keys.set($("key-api").value.trim(), $("key-admin").value.trim());
    retryMetrics();
    reload();
  });
  hooks.unauthorized = (err, admin) => {
    if (!admin) askForKeys(err.message);
  };
}

async function start() {
  initTabs();
  let adapters = [];
  let ready = false;
  const reload = async () => {
    try {
      adapters = (await refreshModels()).filter((m) => m.parent).map((m) => m.id);
      if (!ready) {
        ready = true;
        initCompare(adapters);
        document.body.dataset.ready = "1";
      }
      loadAdapters();
    } catch {
      // a 401 has opened the key dialog; a 503 is shown by the status line until the model is loaded
    }
  };
  const compare = (name) => {
    useModel(name);
    select("compare", true);
  };
  initKeys(reload);
  initAdapters(() => refreshModels().catch(() => {}));
  initTrain({ done: () => refreshModels().catch(() => {}), compare });
  let last = null;
  onReadiness((status, message) => {
    $("status").textContent = status === "ready" ? "ready" : `${status}${message ? `: ${message}` : ""}`;
    $("status").dataset.status = status;
    if (status === "ready" && last !== "ready") reload();
    last = status;
  });
  initMonitor();
}

start();
