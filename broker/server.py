"""The broker's socket loop: one zmq.Poller around the pure core.

Each iteration drains the readable sockets into the core, lets the core
dispatch, commits the journal, and only then sends replies, task batches and
events, so nothing is acknowledged before it is durable.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import zmq

from broker.core import Core
from broker.events import EVENTS_HOLD_S, EVENTS_SNDHWM, MAX_RUN
from broker.logs import get_logger
from broker.mdp import MdpBridge
from broker.protocol import (CLIENT_TAG, DEFAULT_BACKEND, DEFAULT_EVENTS, DEFAULT_FRONTEND, FETCH_IN_SUBMIT,
                             MDP_CLIENT_TAG, MDP_WORKER_TAG, WORKER_TAG, WRONG_PORT, Command, Message, ProtocolError,
                             Topic, decode, encode, event_body)
from broker.security import is_loopback
from broker.shared import drain, readable, send_frames, send_pair

log = get_logger(__name__)

#: most messages taken from one socket per loop iteration, so no socket starves the others
DRAIN_BATCH = 2000
#: encoded event topics (the hot ones; any other is encoded when sent)
_TOPICS = {t: t.encode() for t in Topic.ALL}
#: message cap with --journal: a task's arrays become one SQLite value, and SQLite refuses
#: values over 1e9 bytes (a refused message is answered; a failed commit would stop the broker)
MAX_JOURNALED_MESSAGE_BYTES = 990_000_000
#: linger on close for the backend, so a stopping broker's DISCONNECTs reach workers
STOP_LINGER_MS = 300


@dataclass
class BrokerConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    events: str = DEFAULT_EVENTS
    heartbeat_s: float = 1.0
    liveness: int = 3
    max_retries: int = 3
    journal: str | None = None
    result_ttl_s: float = 3600.0
    no_worker_timeout_s: float = 10.0
    max_message_bytes: int = 1 << 30


class Broker:
    """Binds the three sockets and runs the loop until ``stop()``."""

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None, security=None) -> None:
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.security = security
        self.journal = None
        if config.journal and config.max_message_bytes > MAX_JOURNALED_MESSAGE_BYTES:
            # a warning only where someone asked for more than a journal can hold, not at the default
            level = log.debug if config.max_message_bytes == BrokerConfig.max_message_bytes else log.warning
            level("max_message_bytes_lowered", requested=config.max_message_bytes,
                  now=MAX_JOURNALED_MESSAGE_BYTES, why="SQLite stores no value over 1e9 bytes")
            config.max_message_bytes = MAX_JOURNALED_MESSAGE_BYTES
        if config.journal:
            from broker.journal import Journal

            self.journal = Journal(config.journal)
        self.core = Core(heartbeat_s=config.heartbeat_s, liveness=config.liveness, max_retries=config.max_retries,
                         no_worker_timeout_s=config.no_worker_timeout_s, result_ttl_s=config.result_ttl_s,
                         journal=self.journal, boot=os.urandom(6).hex())
        self.mdp = MdpBridge(self.core)  # Majordomo peers, translated to and from core calls
        self.frontend = self._socket(zmq.ROUTER, security, "client")
        self.backend = self._socket(zmq.ROUTER, security, "worker")
        self.events = self._socket(zmq.XPUB, security, "client")
        self.frontend.bind(config.frontend)
        self.backend.bind(config.backend)
        self.events.bind(config.events)
        self.endpoints = {name: s.getsockopt_string(zmq.LAST_ENDPOINT)
                          for name, s in (("frontend", self.frontend), ("backend", self.backend), ("events", self.events))}
        self._topics: set[bytes] = set()
        self.core.publish = False
        if self.journal is not None:
            self.journal.restore(self.core, time.monotonic())
        self._running = False
        self._held_since: float | None = None  #: when the oldest event held for a later flush came

    def _socket(self, kind: int, security, role: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.sndhwm = 0  # replies and batches are bounded by the protocol, never drop them
            sock.rcvhwm = 0
        else:
            sock.sndhwm = EVENTS_SNDHWM  # per subscriber; messages of at most MAX_RUN events
        if security is not None:
            security.apply_server(sock, role)
        return sock

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        core = self.core
        poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.events):
            poller.register(sock, zmq.POLLIN)
        self._running = True
        log.info("broker_started", **self.endpoints, journal=self.config.journal, curve=self.security is not None)
        self._log_exposure()
        next_tick = 0.0
        try:
            while self._running:
                now = time.monotonic()
                held = core.results.next_held_due()
                wake = next_tick if held is None else min(next_tick, held)
                ready = dict(poller.poll(math.ceil((wake - now) * 1000) if wake > now else 0))
                now = time.monotonic()
                core.wall = time.time()
                if self.frontend in ready:
                    self._drain_frontend(now)
                if self.backend in ready:
                    self._drain_backend(now)
                if self.events in ready:
                    self._drain_subscriptions()
                if now >= next_tick:
                    core.on_tick(now)
                    next_tick = now + core.next_tick_in()
                self._send(*self.mdp.route(core.flush(now, self._events_due(now)), now))
        finally:
            core.shutdown()
            now = time.monotonic()
            self._send(*self.mdp.route(core.flush(now), now))
            if self.journal is not None:
                self.journal.close()
            self.backend.setsockopt(zmq.LINGER, STOP_LINGER_MS)
            for sock in (self.frontend, self.backend, self.events):
                sock.close()
            log.info("broker_stopped")

    def _events_due(self, now: float) -> bool:
        """Whether this flush publishes the events held so far: yes where no input waits (the
        loop would sleep), where a message's worth is held, or where the oldest has waited
        ``EVENTS_HOLD_S``. While input keeps coming, several flushes' events go out as one
        message per topic instead of a few each (the subscribers' and this loop's cost per message)."""
        held = self.core.events_held
        if not held:
            self._held_since = None
            return True
        if self._held_since is None:
            self._held_since = now
        due = (held >= MAX_RUN or now - self._held_since >= EVENTS_HOLD_S
               or not (readable(self.frontend) or readable(self.backend)))
        if due:
            self._held_since = None
        return due

    def _log_exposure(self) -> None:
        if self.security is not None:
            return
        cfg = self.config
        exposed = [e for e in (cfg.frontend, cfg.backend, cfg.events) if not is_loopback(e)]
        if exposed:
            log.warning("broker_exposed_without_curve", endpoints=exposed,
                        hint="anyone who reaches these endpoints can submit, serve and read results; "
                             "use --curve-secret with --client-keys and --worker-keys")
        else:
            log.info("broker_loopback_only", hint="no CURVE: bound to loopback, reachable from this machine only")

    @staticmethod
    def _handle(peer: str, handler, *args) -> bool:
        """Hand one peer message to a handler. A crash there is a bug that peer input reached:
        log it and keep serving everyone else. False where it crashed."""
        try:
            handler(*args)
            return True
        except Exception as exc:
            log.exception("peer_input_crashed", peer=peer, handler=handler.__qualname__, error=repr(exc))
            return False

    def _too_big(self, frames) -> bool:
        # MAXMSGSIZE caps each frame; this caps the whole multipart message
        return sum(len(f) for f in frames) > self.config.max_message_bytes

    # ------------------------------------------------------------- input

    def _drain_frontend(self, now: float) -> None:
        for frames in drain(self.frontend, DRAIN_BATCH):
            route = frames[0].bytes
            if len(frames) > 1 and frames[1].bytes == WORKER_TAG:
                self._wrong_port_worker(route)
                continue
            # REQ clients (and DEALERs that imitate them) put an empty frame before the body
            if len(frames) < 3 or frames[1].bytes != b"":
                self._client_error(route, "expected an empty delimiter frame after the routing id")
                continue
            if self._too_big(frames):
                self._client_error(route, f"message exceeds {self.config.max_message_bytes} bytes",
                                   _rid_of(frames[2:5]))
                continue
            tag = frames[2].bytes
            if tag == CLIENT_TAG:
                try:
                    msg = decode(frames[2:], CLIENT_TAG)
                except ProtocolError as exc:
                    self._client_error(route, str(exc))
                    continue
                fetch = msg.header.pop(FETCH_IN_SUBMIT, None) if msg.command is Command.SUBMIT else None
                self._on_client(route, msg, now)
                if fetch is not None:
                    self._on_fetch_in_submit(route, fetch, now)
            elif tag == MDP_CLIENT_TAG:
                self._handle("mdp client", self.mdp.on_client, route, frames[2:], now)
            else:
                self._client_error(route, f"unknown protocol {tag[:16]!r}: expected {CLIENT_TAG!r}")

    def _on_client(self, route: bytes, msg: Message, now: float) -> None:
        if not self._handle("client", self.core.on_client, route, msg, now):
            self._client_error(route, "internal error while handling the request")

    def _on_fetch_in_submit(self, route: bytes, header, now: float) -> None:
        """The FETCH a SUBMIT carried, handled as the message right after it. Where nothing else
        waits (a lone round trip), the SUBMIT's tasks go to their workers and its ACCEPTED back
        first: the FETCH only parks, and need not hold them up."""
        if not isinstance(header, dict):
            self._client_error(route, f"a SUBMIT's {FETCH_IN_SUBMIT!r} must be a FETCH header (a map)")
            return
        if not readable(self.frontend):
            self._send(*self.mdp.route(self.core.flush(now, send_events=False), now))
        self._on_client(route, Message(Command.FETCH, header), now)

    def _client_error(self, route: bytes, error: str, rid: int | None = None) -> None:
        log.info("client_message_refused", error=error)
        self._send_client(route, Message(Command.ERROR, {"rid": rid, "error": error}))

    def _drain_backend(self, now: float) -> None:
        for frames in drain(self.backend, DRAIN_BATCH):
            wid = frames[0].bytes
            if self._too_big(frames):
                self.core.drop_worker_input(wid, f"message exceeds {self.config.max_message_bytes} bytes", now)
                continue
            tag = frames[1].bytes if len(frames) > 1 else b""
            if tag == WORKER_TAG:
                try:
                    msg = decode(frames[1:], WORKER_TAG)
                except ProtocolError as exc:
                    self.core.drop_worker_input(wid, str(exc), now)
                    continue
                self._handle("worker", self.core.on_worker, wid, msg, now)
            elif tag == b"" and len(frames) > 2 and frames[2].bytes == MDP_WORKER_TAG:  # MDP: [wid, b"", MDPW01, ...]
                self._handle("mdp worker", self.mdp.on_worker, wid, frames[2:], now)
            elif tag == b"" and len(frames) > 2 and frames[2].bytes == CLIENT_TAG:
                self._wrong_port_client(wid, _rid_of(frames[2:5]))
            else:
                self.core.drop_worker_input(wid, f"unknown protocol {tag[:16]!r}", now)

    def _wrong_port_worker(self, route: bytes) -> None:
        """A worker dialled the client port: tell it where to go; it reports that and exits."""
        reason = f"{WRONG_PORT}: this is the broker's client port; workers connect to {self.endpoints['backend']}"
        log.info("worker_on_client_port", hint=reason)
        self._send_frames(self.frontend, [route, *encode(WORKER_TAG, Message(Command.DISCONNECT, {"reason": reason}))])

    def _wrong_port_client(self, route: bytes, rid: int | None) -> None:
        """A client dialled the worker port: answer in its own protocol, so it fails at once."""
        error = f"{WRONG_PORT}: this is the broker's worker port; clients connect to {self.endpoints['frontend']}"
        log.info("client_on_worker_port", hint=error)
        reply = Message(Command.ERROR, {"rid": rid, "error": error, "fatal": True})
        self._send_frames(self.backend, [route, b"", *encode(CLIENT_TAG, reply)])

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                sub = self.events.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if sub[:1] == b"\x01":
                self._topics.add(sub[1:])
            elif sub[:1] == b"\x00":
                self._topics.discard(sub[1:])
        self.core.publish = bool(self._topics)

    # ------------------------------------------------------------- output

    def _send(self, out, wire) -> None:
        if self.journal is not None:
            self.journal.commit()  # durable before anyone hears of it
        for wid, msg in out.workers:
            self._send_worker(wid, msg)
        for frames in wire.backend:
            self._send_frames(self.backend, frames)
        for route, msg in out.clients:
            self._send_client(route, msg)
        for frames in wire.frontend:
            self._send_frames(self.frontend, frames)
        if out.events:
            sock, topics = self.events, _TOPICS
            for topic, events in out.events:  # one message per run of one topic
                # the backend socket's send: pyzmq's wrappers cost more than the event
                send_pair(sock, topics.get(topic) or topic.encode(), event_body(events))

    def _send_worker(self, wid: bytes, msg) -> None:
        try:
            send_frames(self.backend, [wid, *encode(WORKER_TAG, msg)])
        except zmq.ZMQError as exc:
            log.warning("worker_send_failed", worker=wid.hex(), error=str(exc))

    def _send_frames(self, sock: zmq.Socket, frames: list) -> None:
        try:
            send_frames(sock, frames)
        except zmq.ZMQError as exc:
            log.warning("mdp_send_failed", error=str(exc))

    def _send_client(self, route: bytes, msg) -> None:
        try:
            send_frames(self.frontend, [route, b"", *encode(CLIENT_TAG, msg)])
        except zmq.ZMQError as exc:
            log.warning("client_send_failed", error=str(exc))


def _rid_of(head: list) -> int | None:
    """The request id of a message refused unread (too big), so its client can tell which one."""
    try:
        rid = decode(head, CLIENT_TAG).header.get("rid")
    except ProtocolError:
        return None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
