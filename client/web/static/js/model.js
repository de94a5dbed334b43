// The cluster as the page knows it: a snapshot, kept current by the event stream.
// broker.stats (about once a second) carries the authoritative counts and corrects any drift.

export const TASKS_KEPT = 500;
export const FAILURES_KEPT = 50;
export const CHART_SECONDS = 300;

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export class Model {
  constructor() {
    this.counts = { queued: 0, running: 0, done: 0, failed: 0, cancelled: 0 };
    this.workers = new Map();
    this.tasks = new Map(); // task_id -> task, in submission order, the newest TASKS_KEPT
    this.failures = [];
    this.stats = {};
    this.queues = {};
    this.seq = null;
    this.served = new Set();
    this.seconds = new Map(); // unix second -> {submitted, succeeded, failed}
    this.holding = new Map(); // task_id -> {worker, resources} of running tasks: what they hold
    this.version = 0; // bumped on every change, so views redraw only when needed
  }

  changed() {
    this.version += 1;
  }

  snapshot(s) {
    this.seq = s.seq;
    for (const k of Object.keys(this.counts)) this.counts[k] = Number(s[k] || 0);
    this.queues = s.queues || {};
    this.workers = new Map();
    for (const w of s.workers || []) this.workers.set(w.name, { ...w });
    this.holding = new Map();
    for (const t of s.running_tasks || []) {
      this.holding.set(t.task_id, { worker: t.worker, resources: t.resources || {} });
      const task = this.tasks.get(t.task_id);
      if (task && !FINAL.has(task.state)) Object.assign(task, { state: "running", worker: t.worker });
    }
    this.refreshServed();
    this.changed();
  }

  // the gateway's per-second history, so the chart starts full
  seed(rows) {
    for (const [sec, submitted, succeeded, failed] of rows) {
      const b = this.seconds.get(sec) || { submitted: 0, succeeded: 0, failed: 0 };
      this.seconds.set(sec, { submitted: Math.max(b.submitted, submitted), succeeded: Math.max(b.succeeded, succeeded),
        failed: Math.max(b.failed, failed) });
    }
  }

  hold(taskId, worker, resources) {
    const w = this.workers.get(worker);
    if (!w) return;
    this.holding.set(taskId, { worker, resources });
    w.free = { ...(w.free || w.resources) };
    for (const [r, q] of Object.entries(resources || {})) w.free[r] = (w.free[r] ?? 0) - q;
  }

  release(taskId) {
    const held = this.holding.get(taskId);
    if (!held) return;
    this.holding.delete(taskId);
    const w = this.workers.get(held.worker);
    if (!w) return;
    for (const [r, q] of Object.entries(held.resources || {})) w.free[r] = Math.min((w.free[r] ?? 0) + q, w.resources[r] ?? q);
  }

  refreshServed() {
    this.served = new Set();
    for (const w of this.workers.values()) for (const t of w.serves || w.tasks_served || []) this.served.add(t);
  }

  bucket() {
    const sec = Math.floor(Date.now() / 1000);
    let b = this.seconds.get(sec);
    if (!b) {
      b = { submitted: 0, succeeded: 0, failed: 0 };
      this.seconds.set(sec, b);
      for (const key of this.seconds.keys()) {
        if (key > sec - CHART_SECONDS - 2) break;
        this.seconds.delete(key);
      }
    }
    return b;
  }

  task(ev, create) {
    let t = this.tasks.get(ev.task_id);
    if (!t && create) {
      t = { task_id: ev.task_id, name: ev.name, state: "queued", submitted_at: ev.ts, worker: null, run_s: null };
      this.tasks.set(ev.task_id, t);
      if (this.tasks.size > TASKS_KEPT) this.tasks.delete(this.tasks.keys().next().value);
    }
    return t;
  }

  // tasks listed by GET /api/tasks (newest first) when the page opens
  merge(list) {
    const known = this.tasks;
    this.tasks = new Map();
    for (const t of [...list].reverse()) this.tasks.set(t.task_id, { ...t });
    for (const [id, t] of known) this.tasks.set(id, t);
    this.changed();
  }

  // recent failures from the gateway's window (newest first), behind the ones the stream brought
  mergeFailures(list) {
    const seen = new Set(this.failures.map((f) => f.task_id));
    for (const t of list) {
      if (seen.has(t.task_id) || !t.error) continue;
      this.failures.push({ task_id: t.task_id, name: t.name, worker: t.worker, ts: t.submitted_at, error: t.error });
    }
    this.failures.length = Math.min(this.failures.length, FAILURES_KEPT);
    this.changed();
  }

  event(topic, ev) {
    this.seq = ev.seq;
    const c = this.counts;
    const w = ev.worker !== undefined ? this.workers.get(ev.worker) : undefined;
    switch (topic) {
      case "task.submitted": {
        c.queued += 1;
        this.bucket().submitted += 1;
        this.task(ev, true);
        break;
      }
      case "task.started": {
        c.queued -= 1;
        c.running += 1;
        if (w) w.running = (w.running || 0) + 1;
        this.hold(ev.task_id, ev.worker, ev.resources);
        const t = this.task(ev, false);
        if (t && !FINAL.has(t.state)) Object.assign(t, { state: "running", worker: ev.worker });
        break;
      }
      case "task.succeeded": {
        c.running -= 1;
        c.done += 1;
        this.bucket().succeeded += 1;
        if (w) { w.running = Math.max(0, (w.running || 0) - 1); w.tasks = (w.tasks || 0) + 1; }
        this.release(ev.task_id);
        const t = this.task(ev, false);
        if (t) Object.assign(t, { state: "succeeded", worker: ev.worker, run_s: ev.run_s });
        break;
      }
      case "task.failed": {
        if (ev.worker) c.running -= 1; else c.queued -= 1;
        c.failed += 1;
        this.bucket().failed += 1;
        if (w) w.running = Math.max(0, (w.running || 0) - 1);
        this.release(ev.task_id);
        const t = this.task(ev, false);
        const error = { type: ev.error_type || "Error", message: ev.error || "" };
        if (t) Object.assign(t, { state: "failed", worker: ev.worker || t.worker, error });
        this.failures.unshift({ task_id: ev.task_id, name: ev.name, worker: ev.worker, ts: ev.ts, error });
        if (this.failures.length > FAILURES_KEPT) this.failures.length = FAILURES_KEPT;
        break;
      }
      case "task.retried": {
        c.running -= 1;
        c.queued += 1;
        this.release(ev.task_id);
        const t = this.task(ev, false);
        if (t && t.worker) {
          const tw = this.workers.get(t.worker);
          if (tw) tw.running = Math.max(0, (tw.running || 0) - 1);
        }
        if (t) t.state = "queued";
        break;
      }
      case "task.cancelled": {
        c.queued -= 1;
        c.cancelled += 1;
        const t = this.task(ev, false);
        if (t) t.state = "cancelled";
        break;
      }
      case "worker.joined": {
        const resources = ev.resources || {};
        this.workers.set(ev.worker, { name: ev.worker, resources, free: { ...resources }, slots: ev.slots, running: 0,
          tasks: 0, serves: ev.tasks || [], state: "ready", heartbeat_age_s: 0 });
        this.refreshServed();
        break;
      }
      case "worker.lost":
      case "worker.left": {
        this.workers.delete(ev.worker);
        for (const [id, held] of this.holding) if (held.worker === ev.worker) this.holding.delete(id);
        this.refreshServed();
        break;
      }
      case "broker.stats": {
        this.stats = ev;
        for (const k of ["queued", "running", "done", "failed"]) if (typeof ev[k] === "number") c[k] = ev[k];
        if (ev.queues) this.queues = ev.queues;
        for (const [name, info] of Object.entries(ev.per_worker || {})) {
          const pw = this.workers.get(name);
          if (pw) Object.assign(pw, info);
          if (pw && info.running === 0) pw.free = { ...pw.resources }; // idle: exactly what it offers
        }
        break;
      }
      default:
        return;
    }
    this.changed();
  }

  // per-second series for the chart: [times, submitted, succeeded, failed]
  series() {
    const now = Math.floor(Date.now() / 1000);
    const xs = [], sub = [], ok = [], bad = [];
    for (let s = now - CHART_SECONDS; s < now; s++) {
      const b = this.seconds.get(s);
      xs.push(s);
      sub.push(b ? b.submitted : 0);
      ok.push(b ? b.succeeded : 0);
      bad.push(b ? b.failed : 0);
    }
    return [xs, sub, ok, bad];
  }
}
