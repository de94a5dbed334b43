// Recent failures: error type and message; click for the traceback.

import { $, fmtClock, h } from "../dom.js";
import { showTask } from "./detail.js";

let shownVersion = null;

export function renderFailures(model) {
  const first = model.failures[0];
  const key = `${model.failures.length}:${first ? first.task_id : ""}`;
  if (key === shownVersion) return; // unchanged: keep the list still under the pointer
  shownVersion = key;
  const items = model.failures.map((f) => h("li", { dataset: { taskId: f.task_id }, onclick: () => showTask(f.task_id, f) },
    h("span", { class: "ftype" }, f.error.type),
    h("span", { class: "fmsg", title: f.error.message }, f.error.message),
    h("span", { class: "fmeta" }, `${f.name} · ${f.task_id} · ${f.worker || "no worker"} · ${fmtClock(f.ts)}`)));
  $("failures").replaceChildren(...items);
  $("failures-empty").classList.toggle("hidden", items.length > 0);
}
