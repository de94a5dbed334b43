"""Process-wide settings of the long-running commands (broker, worker): the garbage collector's.

A broker allocates several small containers per task and frees them within
milliseconds; CPython's default (a young collection every 700 net allocations,
each older generation after 10 younger ones) then spends 15-20 % of the broker's
CPU walking live tasks and the modules loaded at start. Freezing what start-up
built and collecting the young generation every 50,000 net allocations measured
7-8 % less CPU per task (docs/PERFORMANCE.md); reference cycles are still
collected, so memory stays bounded.
"""

from __future__ import annotations

import gc

#: net allocations between two young collections (CPython's default: 700)
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once start-up is done: what exists now is never collected, young collections are rare."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
