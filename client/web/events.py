"""One subscription to the broker's events feeds every browser: a ring of recent events for
``Last-Event-ID`` resume, and Server-Sent Events fan-out through bounded per-stream buffers.

A reader that falls behind its buffer is disconnected (its browser reconnects and resumes
from the ring, or from a fresh snapshot); it never slows the gateway or the other readers.
The broker sends a run of one topic's events per message (hundreds in a flood): the hub takes
each run in one step (the ring, the counts, the task window), and the events of a tick (``TICK_S``)
are encoded to SSE once, a run per JSON encoder call, into one batch of bytes shared by every
stream: 50 open streams cost 50 list appends, 50 wakeups and 50 writes per tick, whatever the
event rate, and no encoding per stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable

import zmq
from starlette.responses import Response

from broker.logs import get_logger
from client.errors import BrokerUnavailable, GridqError
from client.state import SILENT_AFTER_S
from client.web.ring import EventRing
from client.web.sse import GZIP_HEADER, STREAM_BUFFER_BYTES, Batch, Stream, sse, sse_runs
from client.web.tasks import to_json

log = get_logger(__name__)

#: recent events kept for Last-Event-ID resume
RING_EVENTS = 20_000
#: events gathered into one batch at most before it goes to the streams
BATCH_EVENTS = 10_000
#: seconds events wait to be sent, at most: a burst goes to each stream as one write per tick (the
#: page redraws four times a second: a shorter tick would wake every stream more for nothing seen)
TICK_S = 0.25
#: how long the subscription lets the SUB socket gather between reads while a flood lasts (a trickle
#: is read at once): a loop turn per tenth of a second instead of per broker message; within a tick
FLOOD_WAIT_S = 0.1
#: longest the hub leaves events waiting while an HTTP submission awaits the broker's acceptance
HOLD_MAX_S = 1.0
#: events handled before the hub lets other work on the loop run (a few milliseconds' work)
YIELD_EVERY = 1024
#: seconds between keep-alive comments on a quiet stream (they also reveal a vanished reader)
KEEPALIVE_S = 15.0
#: first pause before resubscribing after the broker went away, doubled up to RETRY_MAX_S
RETRY_MIN_S = 0.25
RETRY_MAX_S = 4.0
#: what EventSource waits before reconnecting, sent once per stream (milliseconds)
RECONNECT_MS = 1000

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no", "content-type": "text/event-stream; charset=utf-8",
               "vary": "accept-encoding"}
#: with gzip (client/web/sse.py)
GZIP_HEADERS = {**SSE_HEADERS, "content-encoding": "gzip"}



class EventHub:
    """The gateway's one subscription: feeds the ring, the streams, the task window and the metrics."""

    def __init__(self, source: Callable[[], AsyncIterator[list]], status: Callable[[], Awaitable[dict]], *,
                 on_events: Callable[[str, list], None] | None = None, on_clear: Callable[[], None] | None = None,
                 metrics=None, ring_events: int = RING_EVENTS,
                 stream_buffer_bytes: int = STREAM_BUFFER_BYTES, tick_s: float = TICK_S) -> None:
        #: batches of runs ``(topic, [fields])``, snapshots as ``("snapshot", [{"seq", "snapshot", "missed"}])``
        #: (``client.follow.follow_batches``)
        self._source = source
        self.tick_s = tick_s
        self._status = status
        self._on_events = on_events  #: each run of events (the task window's waiters)
        self._on_clear = on_clear  #: before the ring is emptied (the task window takes it in first)
        self.metrics = metrics
        self.ring = EventRing(ring_events)  #: runs of recent events, consecutive seqs
        self.head: int | None = None  #: seq of the newest event (or snapshot) handed to the streams
        self.streams: set[Stream] = set()
        self.stream_buffer_bytes = stream_buffer_bytes
        self.link = "connecting"  #: connecting, live or unreachable
        self.error: str | None = None
        self.heard_at = 0.0  #: local monotonic time of the latest item
        self.live = asyncio.Event()
        self._pending: list = []  #: runs for the streams' next batch
        self._pending_events = 0
        self._counts: dict = {}
        self._succeeded: list = []  #: runs of task.succeeded events since the last flush (the run-time histogram)
        self._succeeded_n = 0
        self._flush_handle: asyncio.Handle | None = None
        self._task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._asking: asyncio.Future | None = None  #: the status request new streams are waiting on
        self._holders = 0  #: HTTP submissions awaiting acceptance: events wait (briefly) meanwhile
        self._hold_until = 0.0  #: local monotonic time the current hold ends, whoever still holds
        self._released = asyncio.Event()
        self._released.set()

    # ------------------------------------------------------------ the subscription

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="gridq-web-events")
        self._watchdog = loop.create_task(self._watch(), name="gridq-web-events-watchdog")

    async def close(self) -> None:
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for stream in list(self.streams):
            stream.dropped = True
            stream._wakeup.set()

    async def _run(self) -> None:
        retry_s = RETRY_MIN_S
        while True:
            try:
                async for batch in self._source():
                    if not self._released.is_set() and time.monotonic() < self._hold_until:
                        await self._held()
                    self.heard_at = time.monotonic()
                    chunk, size = [], 0
                    for run in batch:
                        chunk.append(run)
                        size += len(run[1])
                        if size >= YIELD_EVERY:
                            if self._on_items(chunk):
                                retry_s = RETRY_MIN_S
                            chunk, size = [], 0
                            # a flood arrives in thousands of events without a real await between them:
                            # let HTTP requests and the client's own replies in between
                            await asyncio.sleep(0)
                    if chunk and self._on_items(chunk):
                        retry_s = RETRY_MIN_S
            except asyncio.CancelledError:
                raise
            except (GridqError, TimeoutError, zmq.ZMQError) as exc:
                self._set_link("unreachable", str(exc) or type(exc).__name__)
            except Exception as exc:  # a bug must not end the subscription for good
                log.exception("event_subscription_failed")
                self._set_link("unreachable", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, RETRY_MAX_S)

    def hold(self) -> "_Hold":
        """``async with hub.hold():`` events wait while an HTTP submission awaits its acceptance: the
        gateway's CPU goes to the reply first (the SUB socket keeps what comes). A hold lasts
        HOLD_MAX_S at most, however many submissions overlap: events are never held up for long."""
        return _Hold(self)

    async def _held(self) -> None:
        try:
            await asyncio.wait_for(self._released.wait(), max(self._hold_until - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            pass

    async def _watch(self) -> None:
        """The broker publishes broker.stats about once a second: this long without an item, it is away."""
        while True:
            await asyncio.sleep(SILENT_AFTER_S / 3)
            silent_s = time.monotonic() - self.heard_at
            if self.link == "live" and silent_s > SILENT_AFTER_S:
                self._set_link("unreachable", f"no event from the broker for {silent_s:.0f} s")

    def _set_link(self, link: str, error: str | None = None) -> None:
        if link == self.link:
            self.error = error
            return
        (log.info if link == "live" else log.warning)("broker_link", link=link, error=error)
        self.link, self.error = link, error
        if link == "live":
            self.live.set()
        else:
            self.live.clear()
        if self.streams:
            self._flush()
            text = sse(None, "gateway.link", {"link": link, "error": error})
            self._broadcast(Batch(text, None, None, kind="note"))

    def _on_snapshot(self, item: dict) -> None:
        """``item``: ``{"seq", "snapshot", "missed"}``."""
        self._flush()
        snap = to_json(item["snapshot"])
        seq = int(item["seq"])
        if self.metrics is not None:
            self.metrics.state(snap)
            self.metrics.resyncs.inc()
            missed = item.get("missed") or {}  # outcomes the snapshot holds that no event brought: counted too
            self.metrics.events({f"task.{k}": n for k, n in missed.items() if n}, [])
        if self.head is not None and seq != self.head:  # events were missed, or another broker took over
            if self._on_clear is not None:
                self._on_clear()
            self.ring.clear()
            self.head = seq
            self._broadcast(Batch(sse(seq, "snapshot", snap), seq, seq, kind="snapshot"))
        self.head = seq
        self._set_link("live")

    def _on_items(self, runs: list) -> bool:
        """Runs ``(topic, [fields])`` in order (snapshot items among them): into the ring, the counts,
        the window and the streams' next batch, each run in one step; the flush decided once. True
        where a snapshot came."""
        snapshot = False
        for topic, events in runs:
            if topic == "snapshot":
                for item in events:
                    self._on_snapshot(item)
                snapshot = True
                continue
            if self.link != "live":
                self._set_link("live")  # may flush: new counts and a new batch for the streams
            self.ring.add(topic, events)  # encoded only if a stream needs it: no browser open costs no JSON
            self.head = events[-1]["seq"]
            self._counts[topic] = self._counts.get(topic, 0) + len(events)
            if topic == "task.succeeded":
                self._succeeded.append(events)
                self._succeeded_n += len(events)
            elif topic == "broker.stats" and self.metrics is not None:
                for ev in events:
                    self.metrics.state(ev)
            if self._on_events is not None:
                self._on_events(topic, events)
            if self.streams:
                self._pending.append((topic, events))
                self._pending_events += len(events)
        if self._pending_events >= BATCH_EVENTS or self._succeeded_n >= BATCH_EVENTS:
            self._flush()
        elif self._flush_handle is None and (self._pending or self._counts):
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.tick_s, self._flush) if self.tick_s else loop.call_soon(self._flush)
        return snapshot

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.metrics is not None and (self._counts or self._succeeded):
            self.metrics.events(self._counts, self._succeeded)
        self._counts, self._succeeded, self._succeeded_n = {}, [], 0
        if self._pending:
            batch, self._pending, self._pending_events = Batch.of(self._pending), [], 0
            self._broadcast(batch)

    def _broadcast(self, batch: Batch) -> None:
        for stream in list(self.streams):
            if not stream.put(batch):
                self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            log.info("event_stream_dropped", reason="reader fell behind", buffered=stream.limit_bytes)
            if self.metrics is not None:
                self.metrics.sse_dropped.inc()
                self.metrics.sse_streams.set(len(self.streams))

    # ------------------------------------------------------------ streams

    def resumable(self, last_id: int) -> bool:
        if self.head is None:
            return False
        return last_id == self.head or bool(self.ring) and self.ring.first - 1 <= last_id <= self.head

    def resume(self, last_id: int, gzip: bool = False) -> tuple[Stream, bytes]:
        """A stream continuing after ``last_id`` from the ring, none missing, none repeated (and
        the SSE text it starts with)."""
        self._flush()
        text = b""
        if last_id < self.head:
            text = sse_runs(self.ring.after(last_id))
        return self._register(self.head, gzip), text

    async def fresh(self, timeout_s: float, gzip: bool = False) -> tuple[Stream, bytes]:
        """A new stream: a snapshot, then every event after it. BrokerUnavailable if none can be had."""
        if self.head is None:
            # the hub has no snapshot of its own yet: one taken now could be older than it, and the
            # events between the two would reach this stream in neither
            try:
                await asyncio.wait_for(self.live.wait(), timeout_s)
            except (asyncio.TimeoutError, TimeoutError) as exc:
                raise BrokerUnavailable(f"the broker did not answer within {timeout_s:g} s") from exc
        if self._asking is None or self._asking.done():
            # streams opening together (browsers reconnecting after a restart) share one request
            self._asking = asyncio.ensure_future(self._status())
        try:
            snap = await asyncio.wait_for(asyncio.shield(self._asking), timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise BrokerUnavailable(f"the broker did not answer within {timeout_s:g} s") from exc
        self._flush()
        seq = int(snap["seq"])
        text = sse(seq, "snapshot", to_json(snap))
        # events up to seq are in the snapshot; the ones after it that already went by are in the ring
        backlog = b""
        if self.head is not None and seq < self.head:
            backlog = sse_runs(self.ring.after(seq))
        return self._register(max(seq, self.head or seq), gzip), text + backlog

    def _register(self, after: int | None, gzip: bool = False) -> Stream:
        stream = Stream(after, self.stream_buffer_bytes, gzip)
        self.streams.add(stream)
        if self.metrics is not None:
            self.metrics.sse_streams.set(len(self.streams))
        return stream

    def unregister(self, stream: Stream) -> None:
        self.streams.discard(stream)
        if self.metrics is not None:
            self.metrics.sse_streams.set(len(self.streams))


class _Hold:
    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    async def __aenter__(self) -> None:
        if not self.hub._holders:
            self.hub._hold_until = time.monotonic() + HOLD_MAX_S
        self.hub._holders += 1
        self.hub._released.clear()

    async def __aexit__(self, *exc) -> None:
        self.hub._holders -= 1
        if not self.hub._holders:
            self.hub._released.set()


class EventStreamResponse(Response):
    """``text/event-stream`` of one Stream (gzip where the stream is); ends when the reader leaves or
    falls behind."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub, stream: Stream, first: bytes, headers: dict | None = None) -> None:
        self.status_code = 200
        self.background = None
        # no content-length: the body never ends while the reader keeps up
        base = GZIP_HEADERS if stream.gzip else SSE_HEADERS
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in {**base, **(headers or {})}.items()]
        self.hub, self.stream, self.first = hub, stream, first

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            self.hub.unregister(self.stream)
        if not watch.cancelled() and watch.done():
            return  # the reader left
        try:  # fallen behind: end the response (a reader that reads nothing gets its socket closed)
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}), 1.0)
        except (asyncio.TimeoutError, OSError):
            pass

    async def _pump(self, send) -> None:
        stream = self.stream
        first = stream.encode(b"retry: %d\n%s" % (RECONNECT_MS, self.first))
        await send({"type": "http.response.body", "body": GZIP_HEADER + first if stream.gzip else first, "more_body": True})
        while not stream.dropped:
            await stream.wait(KEEPALIVE_S)
            if stream.dropped:
                break
            data = stream.take() or stream.encode(b": keep-alive\n\n")
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


__all__ = ["EventHub", "EventStreamResponse"]
