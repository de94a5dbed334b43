"""The event hub's ring: the most recent events, kept as the runs they came in, for ``Last-Event-ID``
resume, new streams' backlogs and the task window."""

from __future__ import annotations

from collections import deque


class EventRing:
    """Runs ``(topic, [event])``, oldest first, their events of consecutive seqs across runs:
    ``size`` events, or up to a run more (whole runs leave the old end; a run is one broker
    message's events, at most a few hundred). Taking a run in is one append: no step per event."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._runs: deque = deque()
        self._events = 0

    def __len__(self) -> int:
        return self._events

    def add(self, topic: str, events: list) -> None:
        runs = self._runs
        runs.append((topic, events))
        self._events += len(events)
        while self._events - len(runs[0][1]) >= self.size:  # what stays still holds ``size`` events
            self._events -= len(runs.popleft()[1])

    def clear(self) -> None:
        self._runs.clear()
        self._events = 0

    @property
    def first(self) -> int | None:
        """Seq of the oldest event held (None: none)."""
        return self._runs[0][1][0]["seq"] if self._runs else None

    @property
    def last(self) -> int | None:
        """Seq of the newest event held (None: none)."""
        return self._runs[-1][1][-1]["seq"] if self._runs else None

    def after(self, seq: int) -> list:
        """The runs of the events after ``seq``, in order (the first one cut where ``seq`` falls
        inside it), found from the newest end: readers resume near it."""
        out = []
        for topic, events in reversed(self._runs):
            first = events[0]["seq"]
            if first > seq:
                out.append((topic, events))
                continue
            if events[-1]["seq"] > seq:
                out.append((topic, events[seq + 1 - first:]))
            break
        out.reverse()
        return out


__all__ = ["EventRing"]
