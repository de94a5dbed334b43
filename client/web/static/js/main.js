// gridq's live page: wires the model, the event stream and the views; redraws at most 4 times a second.

import { api } from "./api.js";
import { $ } from "./dom.js";
import { Model } from "./model.js";
import { connect } from "./stream.js";
import { renderChart, setupChart } from "./views/chart.js";
import { renderCounters } from "./views/counters.js";
import { renderFailures } from "./views/failures.js";
import { renderTaskNames, setupSubmit } from "./views/submit.js";
import { renderTasks, setupTasks } from "./views/tasks.js";
import { renderWorkers } from "./views/workers.js";
import { setupToken } from "./views/token.js";

const REDRAW_MS = 250;
const model = new Model();
window.gridq = { model }; // for people poking at it in the console

function setLink(link) {
  const el = $("connection");
  el.textContent = link;
  el.className = `badge ${link === "live" ? "live" : link === "connecting" ? "connecting" : "down"}`;
}

function setBroker({ link, error }) {
  const el = $("broker-state");
  el.classList.toggle("hidden", link === "live");
  el.textContent = link === "live" ? "" : `broker ${link}`;
  el.title = error || "";
}

async function loadTasks() {
  try {
    const [page, failed, history] = await Promise.all([api("/api/tasks?limit=200"),
      api("/api/tasks?state=failed&limit=50"), api("/api/throughput")]);
    model.merge(page.tasks);
    model.mergeFailures(failed.tasks);
    model.seed(history.seconds);
    renderChart(model);
  } catch (err) {
    // 401: the token dialog is up; anything else: the stream fills the table
  }
}

let drawn = -1;
function redraw() {
  if (model.version !== drawn) {
    drawn = model.version;
    renderCounters(model);
    renderWorkers(model);
    renderTasks(model);
    renderFailures(model);
    renderTaskNames(model);
  }
}

setupToken(() => {
  loadTasks();
  stream.reopen();
});
setupSubmit();
setupTasks(model);
setupChart(model);
const stream = connect(model, {
  onLink: setLink,
  onBroker: setBroker,
  onClosed: () => api("/api/status").then(() => setBroker({ link: "live" }), (err) => {
    if (err.status === 503) setBroker({ link: "unreachable", error: err.message });
  }),
});
loadTasks();
setInterval(redraw, REDRAW_MS);
setInterval(() => renderChart(model), 1000);
redraw();
