// The workers table: one row per live worker, with data-worker=NAME.

import { $, fmtInt, fmtQty, fmtS, h, text } from "../dom.js";

function resources(w) {
  const total = w.resources || {};
  const free = w.free || total;
  const names = Object.keys(total).sort((a, b) => (a === "cpu" ? -1 : b === "cpu" ? 1 : a.localeCompare(b)));
  return h("span", { class: "res" }, names.map((n, i) => [i ? "  " : "", `${n} `,
    h("b", {}, fmtQty(n, free[n] ?? 0)), `/${fmtQty(n, total[n])}`]));
}

export function renderWorkers(model) {
  const workers = [...model.workers.values()].sort((a, b) => a.name.localeCompare(b.name));
  const rows = workers.map((w) => {
    const slots = w.slots || 0;
    const running = w.running || 0;
    const pct = slots ? Math.min(100, (100 * running) / slots) : 0;
    return h("tr", { dataset: { worker: w.name } },
      h("td", { title: w.name }, w.name),
      h("td", {}, h("span", { class: `pill ${w.state || "ready"}` }, w.state || "ready")),
      h("td", {}, h("span", { class: "load" }, h("span", { class: "load-bar" }, h("span", { style: { width: `${pct}%` } })),
        `${running}/${slots}`)),
      h("td", {}, resources(w)),
      h("td", { class: "num" }, fmtInt(w.tasks)),
      h("td", { class: "num" }, fmtS(w.heartbeat_age_s)));
  });
  $("workers").replaceChildren(...rows);
  $("workers-empty").classList.toggle("hidden", rows.length > 0);
  text("workers-sub", rows.length ? `${rows.length} live` : "");
}
