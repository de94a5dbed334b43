"""The live cluster state, for anyone: a ``Client.status()`` snapshot kept current by the broker's events.

This is the ZeroMQ guide's Clone pattern. Subscribe first, then take a
snapshot (it carries the ``seq`` of the last event it includes), then apply
only events with a higher ``seq``, one by one. Whenever the stream cannot be
trusted any more, take a fresh snapshot:

- a gap: an event whose ``seq`` is not the last one plus one (the SUB socket
  dropped some, or subscribed after the snapshot);
- a restart: ``seq`` goes backwards, or the broker is silent although it
  publishes ``broker.stats`` about once a second;
- a disagreement: ``broker.stats`` counts (global, or a worker's running and
  served tasks) differ from ours at that ``seq``; this also catches the few
  changes no event reports (a timed-out task's late result freeing its slot);
- an event this state cannot account for (a task it does not know as running),
  and ``worker.joined``, whose worker may take over tasks it still runs.

Two positions are kept apart. The *stream* (``wire``): the seq of the last event
handed to readers (``read()`` yields them; ``AsyncClient.events`` passes them on).
Only a gap or a restart breaks it (``broken``); then readers need the fresh
snapshot, and the events after the break wait for it. The *model* (``seq``): the
snapshot plus the events applied to it. A model that stops matching the broker
(a join, a disagreeing ``broker.stats``) takes a fresh snapshot too, but readers
lose nothing meanwhile. Either way, events that arrive while a snapshot is due or
being fetched are held (bounded), and once it is loaded those past its ``seq`` are
applied in order, none twice; those at or before it are in it.

``ClusterState`` can be driven without sockets (``load`` a snapshot, then
``receive`` events) or with them (``poll`` in a loop, or ``start`` a thread).
``snapshot()`` returns the same shape as ``Client.status()``; ``view()`` adds
what a console shows: running tasks, recent failures, throughput, link state.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from typing import Callable

import zmq

from broker.logs import get_logger
from broker.events import MAX_RUN
from broker.protocol import DEFAULT_EVENTS, ProtocolError, read_events
from broker.shared import recv_pair, skip_rest
from client.errors import GridqError
from client.model import ClusterModel, RunningTask, WorkerView

log = get_logger(__name__)

#: a broker publishes broker.stats about once a second: this long without any event means it is gone
SILENT_AFTER_S = 3.0
#: first pause before asking an unreachable broker again, doubled up to RETRY_MAX_S
RETRY_MIN_S = 0.25
RETRY_MAX_S = 4.0
#: events held while a snapshot is due or being fetched, at most
EVENTS_HWM = 200_000
#: messages buffered by the SUB socket at most (each at most broker.events.MAX_RUN events, so about
#: as many events); beyond that ZeroMQ drops them and we see a gap
EVENTS_RCVHWM = EVENTS_HWM // MAX_RUN
#: events applied per poll() at most, so a flood never starves the caller
POLL_BATCH = 5000
#: topics a state needs (everything the broker publishes)
TOPICS = ("task.", "worker.", "broker.")


def events_address_for(frontend: str) -> str:
    """Where the broker at ``frontend`` publishes events, by its defaults: the same host, the
    frontend port + 2 (5555 -> 5557); DEFAULT_EVENTS where the address has no TCP port."""
    scheme, _, rest = frontend.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit():
        return DEFAULT_EVENTS
    return f"tcp://{host}:{int(port) + 2}"


def subscriber(ctx: zmq.Context, address: str, security=None) -> zmq.Socket:
    """A SUB socket on ``address`` subscribed to every topic a state needs (made by ``ctx``:
    a zmq.asyncio context makes an asyncio socket)."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.rcvhwm = EVENTS_RCVHWM
    if security is not None:
        security.apply_client(sock)
    for topic in TOPICS:
        sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    sock.connect(address)
    return sock


#: without a model: the counter each task event adds to; queued stands for every unfinished task
#: (running included), so the counts' sum stays the number of tasks, as a snapshot's
_COUNTED = {"task.succeeded": "done", "task.failed": "failed", "task.cancelled": "cancelled"}


class Link(str, enum.Enum):
    CONNECTING = "connecting"  #: no snapshot taken yet
    LIVE = "live"  #: snapshot applied, events flowing
    RESYNCING = "resyncing"  #: the stream broke off; a fresh snapshot is due
    UNREACHABLE = "unreachable"  #: the broker did not answer the last snapshot request


def _read_maps(topic: bytes, body) -> list[dict]:
    return read_events(body)


class StreamState(ClusterModel):
    """The Clone pattern's bookkeeping, without sockets: which events readers get, when a snapshot is
    due, what is held meanwhile, and the model (``ClusterModel``) kept in step. ``ClusterState``
    adds the broker: the snapshot requests, the SUB socket, a thread."""

    def __init__(self, *, silent_after_s: float = SILENT_AFTER_S, clock: Callable[[], float] = time.monotonic,
                 model: bool = True, decode: Callable[[bytes, bytes], list] | None = None) -> None:
        super().__init__(clock)
        #: a message's events from its topic and body (maps; the gateway's ``read_records`` also
        #: gives records that read like maps); ProtocolError for a bad body
        self.decode = decode or _read_maps
        #: keep the model (snapshot(), view()); without, only the stream is followed (what readers
        #: get, breaks, the outcome counts ``missed`` needs): a fraction of the cost per event
        self.modelled = model
        self.silent_after_s = silent_after_s
        #: connection health, and why the last snapshot was taken or failed
        self.link = Link.CONNECTING
        self.reason: str | None = "first snapshot"
        self.error: str | None = None
        self.down_since: float | None = None  #: local time the broker became unreachable
        #: how many snapshots were taken, and why the stream was distrusted
        self.resyncs = 0
        self.gaps = 0
        self._retry_s = RETRY_MIN_S
        self._next_try = 0.0
        self._heard_at = clock()  #: local time of the latest event received
        #: seq of the latest event handed to readers (or of the snapshot they were given)
        self.wire: int | None = None
        self._wire_synced = False  #: an event past the readers' snapshot has arrived
        #: why readers need a fresh snapshot (before the first, after a gap or restart); None while the stream is whole
        self.broken: str | None = "first snapshot"
        #: after a load that mended a break: task outcomes the snapshot holds that no event brought readers
        self.missed: dict | None = None
        self._counts_at_break: dict | None = None
        self.boot: str | None = None  #: the broker incarnation of the latest snapshot, where its reply said
        #: (topic, fields, handed to readers) received while a snapshot is due, applied after it
        self._held: deque = deque(maxlen=EVENTS_HWM)

    # ================================================================ snapshot

    def load(self, snap: dict, boot: str | None = None) -> list[tuple[str, dict]]:
        """Replace everything with a ``Client.status()`` snapshot (from the broker incarnation ``boot``,
        where the reply said); the stream is trusted again. The events held meanwhile that come after
        it are applied; returns those readers had not had yet, in order (after a break: readers take
        this snapshot first, ``broken`` tells)."""
        with self.lock:
            restarted = int(snap["seq"]) < (self.wire or 0) or None not in (boot, self.boot) and boot != self.boot
            self.missed = self._missed(snap, restarted) if self.broken is not None and self.wire is not None else None
            self.boot = boot or self.boot
            super().load(snap)
            self.resyncs += 1
            self.link = Link.LIVE
            self.error = None
            self.down_since = None
            self._retry_s = RETRY_MIN_S
            self._heard_at = self.clock()
            if self.broken is not None:  # readers start again from this snapshot
                self.broken = None
                self.wire = self.seq
                self._wire_synced = False
            held, self._held = self._held, deque(maxlen=EVENTS_HWM)
            return [(topic, fields) for topic, fields, handed in held if self._take(topic, fields, handed)]

    def _missed(self, snap: dict, restarted: bool) -> dict:
        """Task outcomes a snapshot that mends a break counts and readers got no event for (another
        broker's counts start from zero)."""
        before = dict.fromkeys(self.counts, 0) if restarted else self._counts_at_break or dict(self.counts)
        out = {"succeeded": snap.get("done", 0) - before["done"], "failed": snap.get("failed", 0) - before["failed"],
               "cancelled": snap.get("cancelled", 0) - before["cancelled"]}
        if not restarted:  # the same broker: every task it counts was submitted (a new one replays its journal)
            out["submitted"] = sum(snap.get(k, 0) - v for k, v in before.items())
        return {k: max(v, 0) for k, v in out.items()}

    def unreachable(self, exc: Exception) -> None:
        """The snapshot request failed with ``exc``: say so, and ask again later (backing off)."""
        now = self.clock()
        with self.lock:
            if self.link is not Link.UNREACHABLE:
                log.warning("broker_unreachable", error=str(exc), reason=self.reason)
            self.link = Link.UNREACHABLE
            self.error = str(exc) or type(exc).__name__
            self.down_since = self.down_since or min(self._heard_at, now)  # silent since its last event
            self._next_try = now + self._retry_s
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    def due(self) -> bool:
        """True when a fresh snapshot should be taken now."""
        return self.stale and self.clock() >= self._next_try

    def check_silence(self) -> None:
        """Distrust the stream where the broker has been silent too long (it publishes stats each second)."""
        now = self.clock()
        with self.lock:
            if self.link is Link.LIVE and now - self._heard_at > self.silent_after_s:
                self._distrust(f"broker silent for {now - self._heard_at:.1f} s")

    def _break(self, reason: str) -> None:
        """The stream itself broke: readers wait for a fresh snapshot, and so does the model."""
        self._counts_at_break = dict(self.counts)  # the model's (off by what it holds, where it was resyncing)
        self.broken = reason
        self._distrust(reason)

    def _distrust(self, reason: str) -> None:
        """Stop applying events until a fresh snapshot replaces what we hold."""
        if self.link is Link.LIVE:
            routine = reason.startswith("worker ")  # a join: expected, unlike gaps and restarts
            (log.debug if routine else log.info)("state_resync_needed", reason=reason, seq=self.seq)
            self.link = Link.RESYNCING
            self.reason = reason
            self._next_try = 0.0

    @property
    def stale(self) -> bool:
        """True while a fresh snapshot is due (before the first one, after a gap or restart)."""
        return self.link is not Link.LIVE

    # ================================================================ events

    def receive(self, topic: str, fields: dict) -> bool:
        """One event off the wire; True where readers get it now (the next one on the stream).
        The model applies it now, or holds it for after the snapshot it waits for."""
        if not isinstance(fields.get("seq"), int):
            return False
        with self.lock:
            return self._take(topic, fields, False)

    def _take(self, topic: str, fields: dict, handed: bool) -> bool:
        fresh = not handed and self._on_wire(fields["seq"])
        if handed or fresh:
            if not self.modelled:
                self._count(topic, fields)
            elif self.link is Link.LIVE:
                self._apply_next(topic, fields)
            else:
                self._held.append((topic, fields, True))
        elif self.broken is not None:
            self._held.append((topic, fields, False))
        # else: at or before the snapshot readers were given, so in it
        return fresh

    def _on_wire(self, seq: int) -> bool:
        """Whether ``seq`` is the next event for readers; notes a break where it cannot be."""
        if self.broken is not None:
            return False
        if seq <= self.wire:
            if self._wire_synced:
                self._break(f"broker restarted: seq went from {self.wire} back to {seq}")
            return False  # else: in the snapshot (buffered while it was being taken)
        self._wire_synced = True
        if seq != self.wire + 1:
            self.gaps += 1
            self._break(f"gap: expected seq {self.wire + 1}, got {seq}")
            return False
        self.wire = seq
        return True

    def _whole_run(self, topic: str, events: list) -> bool:
        """Without a model, take a whole message at once where it plainly continues the stream (its
        events carry consecutive seqs, the broker's promise): True where it did."""
        if self.modelled or not events:
            return False
        first, last = events[0].get("seq"), events[-1].get("seq")
        with self.lock:
            if self.broken is not None or self.link is not Link.LIVE or not self._wire_synced \
                    or first != self.wire + 1 or last != self.wire + len(events):
                return False
            self.wire = self.seq = last
            counter = _COUNTED.get(topic)
            if counter is not None:
                self.counts[counter] += len(events)
                self.counts["queued"] -= len(events)
            elif topic == "task.submitted":
                self.counts["queued"] += len(events)
            self._heard_at = self.clock()
            return True

    def _count(self, topic: str, fields: dict) -> None:
        """Without a model: only the counts whose sum and outcomes ``missed`` compares with a snapshot."""
        counter = _COUNTED.get(topic)
        if counter is not None:
            self.counts[counter] += 1
            self.counts["queued"] -= 1
        elif topic == "task.submitted":
            self.counts["queued"] += 1
        self.seq = fields["seq"]
        self._heard_at = self.clock()

    def _apply_next(self, topic: str, fields: dict) -> None:
        seq = fields["seq"]
        if seq <= self.seq:
            return  # in the model's snapshot: readers had it before the model resynced
        if seq != self.seq + 1:  # held events lost (more than EVENTS_HWM): only a snapshot can say
            self._distrust(f"model gap: expected seq {self.seq + 1}, got {seq}")
            self._held.append((topic, fields, True))
            return
        self.seq = seq
        self._heard_at = self.clock()  # only applied events count: a restarted broker's old seqs do not
        self.apply(topic, fields)

    def read(self, sock: zmq.Socket, limit: int = POLL_BATCH) -> list[tuple[str, list[dict]]]:
        """Receive what waits on ``sock`` (at most ``limit`` messages), apply it, and return the
        events readers get, contiguous in ``seq`` since their snapshot, as runs of one topic
        ``(topic, [fields])``: a message that continues the stream is one run, taken whole."""
        runs = []
        for _ in range(limit):
            try:
                topic, body = recv_pair(sock)
            except zmq.Again:
                break
            try:
                events = self.decode(topic, body)
            except ProtocolError:  # a bad body, or a message not of two parts: the next starts afresh
                skip_rest(sock)
                continue
            topic = topic.decode("ascii", "replace")
            if self._whole_run(topic, events):  # without a model, a message that continues the stream: one step
                runs.append((topic, events))
                continue
            # one message may carry several events of its topic, in seq order
            taken = [fields for fields in events if self.receive(topic, fields)]
            if taken:
                runs.append((topic, taken))
        return runs


class ClusterState(StreamState):
    """Snapshot + events = the broker's state, exactly, for anyone's code.

    ``client`` is anything with a ``status()`` method returning the snapshot
    (a ``client.Client``); ``events`` the broker's PUB endpoint. Thread-safe:
    one thread may ``poll`` while others read ``snapshot()``/``view()``.
    What each event means is ``ClusterModel``'s (client/model.py); this class
    keeps the model in step with the broker: seq checks, resyncs, the socket.
    """

    def __init__(self, client, events: str = DEFAULT_EVENTS, *, context: zmq.Context | None = None,
                 silent_after_s: float = SILENT_AFTER_S, clock: Callable[[], float] = time.monotonic,
                 model: bool = True, decode: Callable[[bytes, bytes], list] | None = None) -> None:
        super().__init__(silent_after_s=silent_after_s, clock=clock, model=model, decode=decode)
        self.client = client
        self.events_address = events
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ================================================================ snapshot

    def resync(self) -> bool:
        """Take a fresh snapshot from the broker; False (and ``link`` UNREACHABLE) where it did not answer."""
        try:
            snap = self.client.status()
        except (GridqError, TimeoutError) as exc:  # BrokerUnavailable, or a refused request
            self.unreachable(exc)
            return False
        log.debug("state_resynced", seq=snap.get("seq"), reason=self.reason)
        self.load(snap)
        return True

    # ================================================================ reading

    def view(self) -> dict:
        """``snapshot()`` plus what a console shows: link, stats, failures, workers gone."""
        now = self.clock()
        with self.lock:
            out = self.snapshot()
            out.update(
                link=self.link.value, reason=self.reason, error=self.error,
                down_s=None if self.down_since is None else round(now - self.down_since, 1),
                resyncs=self.resyncs, gaps=self.gaps, restarts=self.restarts, mismatches=self.mismatches,
                stats=dict(self.stats), stats_age_s=None if self.stats_at is None else round(now - self.stats_at, 1),
                failures=list(self.failures), gone=list(self.gone), events=self.events_address,
            )
            return out

    # ================================================================ sockets

    def connect(self) -> None:
        """Subscribe to the broker's events (before the first snapshot, so none is missed)."""
        if self._sock is not None:
            return
        # the events socket has the same CURVE policy as the client's
        sock = subscriber(self._ctx, self.events_address, getattr(self.client, "_security", None))
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        # A SUB connects asynchronously: wait (briefly) for the first event, so the
        # subscription is live before the snapshot and nothing falls between them.
        if self._poller.poll(self.silent_after_s * 1000 / 2):
            self._drain(POLL_BATCH)

    def poll(self, timeout_s: float = 0.1) -> int:
        """Snapshot when due, then apply the events that arrive within ``timeout_s``; returns how many."""
        if self._sock is None:
            self.connect()
        if self.due():
            self.resync()
        applied = 0
        if self._poller.poll(max(timeout_s, 0.0) * 1000):
            applied = self._drain(POLL_BATCH)
        self.check_silence()
        return applied

    def _drain(self, limit: int) -> int:
        return sum(len(events) for _, events in self.read(self._sock, limit))

    def start(self) -> "ClusterState":
        """Keep the state current on a background thread until ``close()``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gridq-cluster-state", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.connect()
            while not self._stopping.is_set():
                self.poll(0.1)
        except Exception as exc:
            log.exception("cluster_state_thread_crashed")
            with self.lock:  # readers must not take a frozen picture for a live one
                self.link = Link.UNREACHABLE
                self.error = f"state thread crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def wait(self, predicate: Callable[["ClusterState"], bool], timeout_s: float) -> bool:
        """Wait (on a started state) until ``predicate(self)`` holds; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._close_socket()

    def __enter__(self) -> "ClusterState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

__all__ = ["ClusterState", "StreamState", "Link", "WorkerView", "RunningTask", "DEFAULT_EVENTS", "events_address_for"]
