"""The worker's side of liveness, pure: when to heartbeat, when the broker counts as gone, how long
to back off before a fresh socket, and when a drain is over. Time comes in as ``now``."""

from __future__ import annotations

#: longest pause between two reconnect attempts, in heartbeats
MAX_BACKOFF_HEARTBEATS = 8
#: longest finished work (a result, an ahead task's start) waits here before it is reported
REPORT_START_S = 0.002
#: longest one poll of the worker's loop, so a stop request is seen soon
MAX_POLL_S = 0.25


class Liveness:
    """Heartbeats both ways, reconnect backoff and the drain deadline of one worker.

    The loop reports what happened (``heard``, ``sent``, ``redialled``) and asks what
    to do (``heartbeat_due``, ``broker_silent``, ``wait_s``, ``drain_over``); it owns
    no socket and reads no clock, so tests drive it with a fake one.
    """

    def __init__(self, heartbeat_s: float, liveness: int, drain_s: float, now: float) -> None:
        self.heartbeat_s = heartbeat_s
        self.silence_s = heartbeat_s * liveness  #: the broker is gone after this long unheard
        self.drain_s = drain_s
        self.backoff_s = heartbeat_s  #: pause before the next fresh socket while the broker stays away
        self.heard_at = now  #: when the broker was last heard (pushed ahead while backing off)
        self.sent_at = now  #: when this worker last sent anything
        self.drain_deadline: float | None = None  #: set once a drain starts

    # ------------------------------------------------------------ what happened

    def heard(self, now: float) -> None:
        """Anything from the broker: it is alive, and the backoff starts over."""
        self.heard_at = now
        self.backoff_s = self.heartbeat_s

    def sent(self, now: float) -> None:
        """Anything to the broker counts as a heartbeat."""
        self.sent_at = now

    def redialled(self, now: float) -> None:
        """A fresh socket was made: wait out the backoff before judging the broker silent again,
        then back off twice as long next time (up to MAX_BACKOFF_HEARTBEATS heartbeats)."""
        self.heard_at = self.sent_at = now
        if self.backoff_s > self.silence_s:
            self.heard_at += self.backoff_s - self.silence_s
        self.backoff_s = min(self.backoff_s * 2, self.heartbeat_s * MAX_BACKOFF_HEARTBEATS)

    def start_drain(self, now: float) -> bool:
        """The worker is stopping: True the first time (hand back what has not started), after
        which running tasks have ``drain_s`` to finish."""
        if self.drain_deadline is not None:
            return False
        self.drain_deadline = now + self.drain_s
        return True

    # ------------------------------------------------------------ what to do

    def heartbeat_due(self, now: float) -> bool:
        return now - self.sent_at >= self.heartbeat_s

    def broker_silent(self, now: float) -> bool:
        return now - self.heard_at >= self.silence_s

    def drain_over(self, now: float) -> bool:
        return self.drain_deadline is not None and now >= self.drain_deadline

    def confirmed(self, sent_at: float) -> bool:
        """Whether a DONE sent at ``sent_at`` is durable: the broker commits its journal before it
        sends anything, so what it sent this long after that DONE comes after the commit."""
        return sent_at + 2 * self.heartbeat_s <= self.heard_at

    def wait_s(self, now: float, output_pending: bool) -> float:
        """How long the loop may poll: until the next heartbeat or silence deadline, shorter
        while finished work waits to be reported."""
        wait_s = max(0.0, min(self.sent_at + self.heartbeat_s, self.heard_at + self.silence_s) - now)
        if output_pending:
            wait_s = min(wait_s, REPORT_START_S)  # a start to report, no result to carry it yet
        return min(wait_s, MAX_POLL_S)
