// A task's details in a dialog: state, worker, result or error with its traceback, all as text.

import { api } from "../api.js";
import { $, fmtClock, fmtS, h } from "../dom.js";

function fill(title, fields, body) {
  $("detail-title").textContent = title;
  $("detail-fields").replaceChildren(...Object.entries(fields).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  $("detail-body").textContent = body;
}

function describe(t) {
  const fields = { name: t.name, state: t.state, worker: t.worker || "–", run: fmtS(t.run_s),
    submitted: fmtClock(t.submitted_at) };
  if (t.info && t.info.attempts) fields.attempts = t.info.attempts;
  if (t.info && t.info.queued_s !== undefined) fields["queue wait"] = fmtS(t.info.queued_s);
  let body = "";
  if (t.error) {
    fields.error = `${t.error.type}: ${t.error.message}`;
    body = t.error.traceback || (t.via === "events" ? "(no traceback: the task was submitted elsewhere; its client has it)" : "");
  } else if (t.state === "succeeded" && t.result !== undefined) {
    body = JSON.stringify(t.result, null, 2);
  }
  return { fields, body };
}

export async function showTask(taskId, known) {
  const dialog = $("detail");
  if (known) {
    const { fields, body } = describe(known);
    fill(taskId, fields, body);
  } else {
    fill(taskId, {}, "loading…");
  }
  if (!dialog.open) dialog.showModal();
  try {
    const t = await api(`/api/tasks/${encodeURIComponent(taskId)}`);
    const { fields, body } = describe(t);
    fill(taskId, fields, body);
  } catch (err) {
    if (!known) fill(taskId, {}, err.message);
  }
}
