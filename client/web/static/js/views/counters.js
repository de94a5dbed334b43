// The counters row: workers, queued, running, done, failed, latency.

import { fmtInt, fmtS, text } from "../dom.js";

export function renderCounters(model) {
  const c = model.counts;
  const workers = [...model.workers.values()];
  text("count-workers", workers.length);
  text("count-queued", c.queued);
  text("count-running", c.running);
  text("count-done", c.done);
  text("count-failed", c.failed);
  const slots = workers.reduce((n, w) => n + (w.slots || 0), 0);
  text("slots-sub", workers.length ? `${fmtInt(slots)} slots` : "none connected");
  const busy = slots ? Math.round((100 * workers.reduce((n, w) => n + Math.min(w.running || 0, w.slots || 0), 0)) / slots) : 0;
  text("busy-sub", slots ? `${busy}% of slots busy` : "");
  const queues = Object.entries(model.queues || {}).map(([r, n]) => `${r} ${fmtInt(n)}`).join(" · ");
  text("queues-sub", queues && c.queued > 0 ? `waiting for ${queues}` : "");
  const s = model.stats;
  text("rate-sub", s.rate !== undefined ? `${fmtInt(Math.round(s.rate))} tasks/s` : "");
  text("cancelled-sub", c.cancelled ? `${fmtInt(c.cancelled)} cancelled` : "");
  text("latency", s.queued_p50_s !== undefined && s.queued_p50_s !== null
    ? `${fmtS(s.queued_p50_s)} / ${fmtS(s.queued_p99_s)}` : "–");
  text("run-sub", s.run_p50_s !== undefined && s.run_p50_s !== null
    ? `run ${fmtS(s.run_p50_s)} / ${fmtS(s.run_p99_s)}` : "");
  text("seq", model.seq !== null ? `seq ${fmtInt(model.seq)}` : "");
}
