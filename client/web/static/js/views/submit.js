// The submit form: task name and a JSON array of arguments; shows the result when it comes.

import { api } from "../api.js";
import { $, h } from "../dom.js";

const WAIT_S = 30;

function say(kind, message) {
  const out = $("submit-result");
  out.className = `submit-result ${kind}`;
  out.textContent = message;
}

export function setupSubmit() {
  const form = $("submit-form");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const task = String(data.get("task") || "").trim();
    let args;
    try {
      args = JSON.parse(String(data.get("args") || "[]"));
    } catch (err) {
      say("err", `args: not valid JSON (${err.message})`);
      return;
    }
    if (!Array.isArray(args)) {
      say("err", "args: must be a JSON array, such as [7] or [\"text\", 2]");
      return;
    }
    const priority = Number(data.get("priority") || 0);
    const button = $("submit-button");
    button.disabled = true;
    try {
      const accepted = await api("/api/tasks", { method: "POST", body: { task, args, priority: Math.trunc(priority) } });
      say("", `${accepted.task_id} queued…`);
      const t = await api(`/api/tasks/${encodeURIComponent(accepted.task_id)}?wait=${WAIT_S}`);
      if (t.state === "succeeded") say("ok", `${t.task_id} succeeded → ${JSON.stringify(t.result)}`);
      else if (t.state === "failed") say("err", `${t.task_id} failed: ${t.error.type}: ${t.error.message}`);
      else say("", `${t.task_id} is ${t.state}; it shows in the tasks table when it ends`);
    } catch (err) {
      say("err", `${err.type}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });
}

export function renderTaskNames(model) {
  const names = [...model.served].sort();
  const list = $("task-names");
  if (list.childElementCount === names.length) return;
  list.replaceChildren(...names.map((n) => h("option", { value: n })));
}
