"""A compact, expiring record of tasks forgotten after their result was fetched: recognises late resends.

A finished task costs the broker about 1.3 KiB while it is held whole; once its
session has acknowledged the result nothing may ask for it again except a late
copy of its SUBMIT (a Lazy Pirate resend that sat in a socket queue). To
recognise one, the broker keeps a 64-bit hash of ``(session, task_id)`` for
``keep_s``: about 70 bytes per task (an int in a set, 8 bytes in an array) and
no per-task container for the garbage collector to walk.

A resend from the same session is recognised; a task id reused by another
session is not (its hash differs) and is accepted as a new task. Two pairs with
the same 64-bit hash would make a new task look like a resend: at a million
recorded ids the chance per new task is about 5e-14.
"""

from __future__ import annotations

from array import array
from collections import deque

#: entries recorded within this many seconds of each other share one batch (and expire together)
BATCH_SPAN_S = 1.0


class RecentIds:
    """``(session, task_id)`` pairs recorded with ``add``; each is forgotten ``keep_s`` later
    (up to ``BATCH_SPAN_S`` sooner)."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._hashes: set = set()
        self._batches: deque = deque()  #: (expires_at, array of hashes), oldest first

    def add(self, session: str, task_id: str, now: float) -> None:
        self.add_all(session, (task_id,), now)

    def add_all(self, session: str, task_ids, now: float) -> None:
        """``add`` for every id of ``task_ids`` (one session's, recorded at one time)."""
        keys = [hash((session, t)) for t in task_ids]
        expires_at = now + self.keep_s
        if self._batches and self._batches[-1][0] > expires_at - BATCH_SPAN_S:
            self._batches[-1][1].extend(keys)
        else:
            self._batches.append((expires_at, array("q", keys)))
        self._hashes.update(keys)

    def __contains__(self, pair: tuple) -> bool:
        return hash(pair) in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def expire(self, now: float) -> None:
        batches = self._batches
        while batches and batches[0][0] <= now:
            self._hashes.difference_update(batches.popleft()[1])
