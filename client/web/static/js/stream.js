// The live connection: one EventSource on /api/events, reopened with backoff when it closes.
// A reopened stream names the last event it had, so the gateway resumes with none missed.

import { token } from "./api.js";

const TOPICS = ["task.submitted", "task.started", "task.succeeded", "task.failed", "task.retried", "task.cancelled",
  "worker.joined", "worker.lost", "worker.left", "broker.stats"];

export function connect(model, { onLink, onBroker, onClosed }) {
  let source = null;
  let lastId = null;
  let retryMs = 500;
  let timer = null;

  function open() {
    timer = null;
    const params = new URLSearchParams();
    if (token()) params.set("token", token());
    if (lastId !== null) params.set("last_event_id", lastId);
    const qs = params.toString();
    source = new EventSource(`/api/events${qs ? `?${qs}` : ""}`);
    onLink("connecting");
    source.onopen = () => {
      retryMs = 500;
      onLink("live");
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // refused (401, 503) or gone for good: EventSource will not retry by itself
        source.close();
        onLink("reconnecting");
        onClosed();
        timer = setTimeout(open, retryMs);
        retryMs = Math.min(retryMs * 2, 8000);
      } else {
        onLink("reconnecting"); // it reconnects by itself, sending Last-Event-ID
      }
    };
    source.addEventListener("snapshot", (e) => {
      lastId = e.lastEventId;
      model.snapshot(JSON.parse(e.data));
    });
    for (const topic of TOPICS) {
      source.addEventListener(topic, (e) => {
        lastId = e.lastEventId;
        model.event(topic, JSON.parse(e.data));
      });
    }
    source.addEventListener("gateway.link", (e) => onBroker(JSON.parse(e.data)));
  }

  open();
  return {
    reopen() {
      if (source) source.close();
      if (timer) clearTimeout(timer);
      open();
    },
  };
}
