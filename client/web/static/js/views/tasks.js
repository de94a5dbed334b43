// Recent tasks: one row per task with data-task-id and data-state; click for the details.

import { $, fmtClock, fmtS, h } from "../dom.js";
import { showTask } from "./detail.js";

export const ROWS_SHOWN = 100;
let filter = "";

export function setupTasks(model) {
  for (const button of $("task-filters").querySelectorAll("button")) {
    button.addEventListener("click", () => {
      filter = button.dataset.filter;
      for (const b of $("task-filters").querySelectorAll("button")) b.classList.toggle("active", b === button);
      model.changed();
    });
  }
  $("tasks").addEventListener("click", (e) => {
    const row = e.target.closest("tr[data-task-id]");
    if (row) showTask(row.dataset.taskId, model.tasks.get(row.dataset.taskId));
  });
}

export function renderTasks(model) {
  const rows = [];
  const all = [...model.tasks.values()];
  for (let i = all.length - 1; i >= 0 && rows.length < ROWS_SHOWN; i--) {
    const t = all[i];
    if (filter && t.state !== filter) continue;
    rows.push(h("tr", { dataset: { taskId: t.task_id, state: t.state } },
      h("td", { class: "mono", title: t.task_id }, t.task_id),
      h("td", { title: t.name }, t.name),
      h("td", {}, h("span", { class: `pill ${t.state}` }, t.state)),
      h("td", { title: t.worker || "" }, t.worker || "–"),
      h("td", { class: "num" }, t.run_s !== null && t.run_s !== undefined ? fmtS(t.run_s) : "–"),
      h("td", { class: "num" }, fmtClock(t.submitted_at))));
  }
  $("tasks").replaceChildren(...rows);
  $("tasks-empty").classList.toggle("hidden", rows.length > 0);
}
