"""Results on their way to clients: each session's outbox, its parked FETCH, acks and result TTLs."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from broker.events import Outgoing
from broker.protocol import ACCEPTED_IN_RESULTS, Command, Message, ResultRecord, new_record
from broker.recent import RecentIds
from broker.states import TERMINAL

#: how long the id of a task whose result was fetched is still remembered (to recognise late resends)
ACKED_GRACE_S = 120.0
#: without a journal, most keyed results kept in memory once fetched (oldest forgotten first; with a
#: journal they live there and are read back when their key is submitted again)
MAX_KEYED_RESULTS = 100_000


@dataclass(eq=False, slots=True)
class Session:
    """A client's mailbox: finished task ids to deliver, and a parked FETCH."""

    sid: str
    outbox: OrderedDict = field(default_factory=OrderedDict)  #: task_id -> None
    fetch: tuple | None = None  #: (route, rid, max, expires_at)
    held: tuple | None = None  #: (route, ACCEPTED header, seq): an ACCEPTED waiting to go with the next RESULTS


class Sessions:
    """Owns: a finished task is in the outbox of its session and of every watcher until acked
    or forgotten; a parked FETCH is answered as soon as results arrive or its wait ends; a
    finished task is forgotten after its TTL, or as soon as every session that waits for it
    acknowledged it: then only a compact record of its id remains (``recent``), or, for a keyed
    task, its journal row (without a journal: memory, at most ``MAX_KEYED_RESULTS`` of them)."""

    def __init__(self, table, out: Outgoing, result_ttl_s: float, incarnation: dict) -> None:
        self.table = table
        self.out = out
        self.result_ttl_s = result_ttl_s
        self.incarnation = incarnation
        self.sessions: dict[str, Session] = {}
        self._new_results: set = set()  #: sessions with results since the last flush
        self._fetch_expiry: list = []  #: (expires_at, seq, sid, rid); seq: rids are peer data, never compared
        self._fetch_seq = 0
        self._held_due: list = []  #: (due, seq, sid) of held ACCEPTEDs (answered early ones linger, harmless)
        self._held_new: list = []  #: (session, seq, task ids) held since the last release_held
        self.holding = 0  #: ACCEPTEDs held now
        #: finished tasks not fetched yet -> when they are forgotten (after the result TTL);
        #: insertion order is expiry order (the delay is a constant)
        self.expiry: OrderedDict = OrderedDict()
        #: ids of tasks forgotten once fetched, kept a while to recognise a late resend of their SUBMIT
        self.recent = RecentIds(min(ACKED_GRACE_S, result_ttl_s))
        #: without a journal: fetched keyed tasks kept for their key -> None, oldest first
        self.keyed_kept: OrderedDict = OrderedDict()

    def get(self, sid: str) -> Session:
        sess = self.sessions.get(sid)
        if sess is None:
            sess = self.sessions[sid] = Session(sid)
        return sess

    # ------------------------------------------------------------ results in

    def deliver(self, task, sid: str) -> None:
        sess = self.get(sid)
        sess.outbox[task.task_id] = None
        self._new_results.add(sess)

    def finished(self, task, now: float, ttl_s: float | None = None, deliver: bool = True) -> None:
        """``task`` reached a terminal state: to its session and watchers, forgotten after its TTL."""
        if deliver:
            self.deliver(task, task.session)
            for sid in task.watchers:
                self.deliver(task, sid)
        self.expiry[task.task_id] = now + (self.result_ttl_s if ttl_s is None else ttl_s)

    # ------------------------------------------------------------ results out

    def fetch(self, sid: str, route: bytes, rid, acks: list, wait_s: float, limit: int, now: float) -> None:
        sess = self.get(sid)
        if acks:
            self._take_acks(sess, acks, now)
        if sess.fetch is not None:  # a newer fetch replaces a parked one (client resent)
            old_route, old_rid, _, _ = sess.fetch
            self._reply_empty(sess, old_route, old_rid)
            sess.fetch = None
        if sess.outbox or wait_s <= 0:
            self._send_results(sess, route, rid, limit)
        else:
            sess.fetch = (route, rid, limit, now + wait_s)
            self._fetch_seq += 1
            heapq.heappush(self._fetch_expiry, (now + wait_s, self._fetch_seq, sid, rid))

    def flush(self) -> None:
        """Answer the parked FETCHes of sessions that got results."""
        for sess in self._new_results:
            if sess.fetch is not None and sess.outbox:
                route, rid, limit, _ = sess.fetch
                sess.fetch = None
                self._send_results(sess, route, rid, limit)
        self._new_results.clear()

    def hold_accepted(self, sid: str, route: bytes, header: dict, due: float, task_ids: list) -> None:
        """Keep an ACCEPTED (``header``) for the RESULTS that next answers this session's FETCH on
        ``route``; it goes alone at ``due`` if none comes by then, or at the next ``release_held``
        if one of ``task_ids`` is not running by then (its result is not about to come)."""
        sess = self.get(sid)
        if sess.held is not None:
            self._send_held(sess)  # one held at a time: the older goes now
        self._fetch_seq += 1
        sess.held = (route, header, self._fetch_seq)
        self.holding += 1
        heapq.heappush(self._held_due, (due, self._fetch_seq, sid))
        self._held_new.append((sess, self._fetch_seq, task_ids))

    def release_held(self, now: float, running=None) -> None:
        """Send the held ACCEPTEDs whose time is up, and those held since the last call whose tasks
        do not all run (``running(task_id)``: the dispatch that followed the SUBMIT started them)."""
        for sess, seq, task_ids in self._held_new:
            if sess.held is not None and sess.held[2] == seq and not (running and all(map(running, task_ids))):
                self._send_held(sess)
        self._held_new.clear()
        due = self._held_due
        while due and due[0][0] <= now:
            _, seq, sid = heapq.heappop(due)
            sess = self.sessions.get(sid)
            if sess is not None and sess.held is not None and sess.held[2] == seq:
                self._send_held(sess)

    @property
    def has_held(self) -> bool:
        """ACCEPTEDs are held, or were held since the last ``release_held``."""
        return bool(self.holding or self._held_new)

    def next_held_due(self) -> float | None:
        """When ``release_held`` has something to send, at the earliest (None: nothing held)."""
        if not self.holding:
            self._held_due.clear()  # what is left is of ACCEPTEDs that went with their RESULTS
            return None
        return self._held_due[0][0]

    def _send_held(self, sess: Session) -> None:
        route, header, _ = sess.held
        sess.held = None
        self.holding -= 1
        self.out.clients.append((route, Message(Command.ACCEPTED, header)))

    def _results_header(self, sess: Session, route: bytes, rid, records: list) -> dict:
        """A RESULTS header, carrying the session's held ACCEPTED where it waits for this route."""
        header = {"rid": rid, "results": records, **self.incarnation}
        if sess.held is not None and sess.held[0] == route:
            header[ACCEPTED_IN_RESULTS] = sess.held[1]
            sess.held = None
            self.holding -= 1
        return header

    def _reply_empty(self, sess: Session, route: bytes, rid) -> None:
        self.out.clients.append((route, Message(Command.RESULTS, self._results_header(sess, route, rid, []))))

    def _send_results(self, sess: Session, route: bytes, rid, limit: int) -> None:
        records, frames = [], []
        for task_id in sess.outbox:
            task = self.table.get(task_id)
            if task is None or task.result is None:
                continue
            status, value, vframes, info = task.result
            records.append(new_record(ResultRecord, (task_id, status, value, len(vframes), info)))
            frames.extend(vframes)
            if len(records) >= limit:
                break
        self.out.clients.append((route, Message(Command.RESULTS, self._results_header(sess, route, rid, records),
                                                frames)))

    def _take_acks(self, sess: Session, acks: list, now: float) -> None:
        """Acknowledgements of results ``sess`` holds: the plain tasks it submitted leave memory
        here, their ids recorded together (the usual ack: a batch of them); keyed ones in ``_acked``."""
        sid, pop, get = sess.sid, sess.outbox.pop, self.table.get
        plain = []
        for task_id in acks:
            if pop(task_id, 0) is not None:
                continue  # not delivered to this session (or acknowledged already)
            task = get(task_id)
            if task is None or task.result is None:
                continue
            if task.key is not None:
                self._acked(task, sid)
            elif task.session == sid:  # only keyed tasks have watchers
                self.forget(task)
                plain.append(task_id)
        if plain:
            self.recent.add_all(sid, plain, now)

    def _acked(self, task, sid: str) -> None:
        """A session confirmed it holds a keyed task's result (plain ones are settled in
        ``_take_acks``). Once no session waits for it any more, it stays findable by its key: in the
        journal (read back on demand) or, without one, in memory for its TTL (bounded)."""
        task_id = task.task_id
        if any(task_id in sess.outbox for s in (task.session, *task.watchers)
               if (sess := self.sessions.get(s)) is not None):
            return  # another session has still to fetch it
        if self.table.journal is not None:
            self.expiry.pop(task_id, None)
            self.table.delivered(task)
            self.table.drop(task)
        else:
            self.keyed_kept[task_id] = None
            while len(self.keyed_kept) > MAX_KEYED_RESULTS:
                old = self.table.get(self.keyed_kept.popitem(last=False)[0])
                if old is not None and old.state in TERMINAL:
                    self.forget(old)

    # ------------------------------------------------------------ time

    def expire(self, now: float) -> None:
        """Answer FETCHes whose wait ended; forget finished tasks past their TTL."""
        while self._fetch_expiry and self._fetch_expiry[0][0] <= now:
            _, _, sid, rid = heapq.heappop(self._fetch_expiry)
            sess = self.sessions.get(sid)
            if sess is not None and sess.fetch is not None and sess.fetch[1] is rid:  # its own FETCH (a NaN rid != itself)
                route, _, _, _ = sess.fetch
                sess.fetch = None
                self._reply_empty(sess, route, rid)
        expiry = self.expiry
        while expiry and next(iter(expiry.values())) <= now:
            task_id, _ = expiry.popitem(last=False)
            task = self.table.get(task_id)
            if task is not None and task.state in TERMINAL:
                self.forget(task)
        self.recent.expire(now)

    def forget(self, task) -> None:
        task_id, sessions = task.task_id, self.sessions
        self.expiry.pop(task_id, None)
        if task.key is not None:
            self.keyed_kept.pop(task_id, None)
        self.table.forget(task)
        sess = sessions.get(task.session)
        if sess is not None:
            sess.outbox.pop(task_id, None)
        for sid in task.watchers:
            sess = sessions.get(sid)
            if sess is not None:
                sess.outbox.pop(task_id, None)

    def tidy(self) -> None:
        """Drop fetch timers of FETCHes answered early once they outnumber the live ones, and
        sessions with nothing to deliver and no parked FETCH (``deliver`` makes them again)."""
        if len(self._fetch_expiry) > 2 * len(self.sessions) + 1024:
            self._fetch_expiry = [f for f in self._fetch_expiry if (sess := self.sessions.get(f[2])) is not None
                                  and sess.fetch is not None and sess.fetch[1] is f[3]]
            heapq.heapify(self._fetch_expiry)
        idle = [sid for sid, sess in self.sessions.items()
                if not sess.outbox and sess.fetch is None and sess.held is None]
        for sid in idle:
            del self.sessions[sid]
