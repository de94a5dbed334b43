"""What an event stream sends: Server-Sent Events text (a run of events per JSON encoder call),
the batches every stream shares, each reader's bounded buffer, and gzip for readers that take it.

A batch is compressed once, as a self-contained deflate segment (a fresh compressor, ended by a
sync flush), and the same bytes go to every gzip stream: after its gzip header, a stream is any
sequence of such segments, so its own first chunk and the shared batches simply follow one
another. SSE text compresses about tenfold, so 50 streams write a tenth of the bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from operator import itemgetter

import msgspec

try:  # ISA-L's deflate: the same format as zlib's at a quarter of its CPU (level 1: 0.15 against 0.6 us an event)
    from isal import isal_zlib as zlib
except ImportError:  # pragma: no cover - a platform without its wheel
    import zlib

from client.web.records import getter
from client.web.tasks import to_json

#: bytes a stream may have waiting to be sent (as SSE text) before its reader counts as fallen behind
STREAM_BUFFER_BYTES = 4 << 20
#: a fast level: SSE text still shrinks about tenfold (ISA-L's 1, or zlib's fastest)
GZIP_LEVEL = 1
#: a gzip member's header (no name, no time); what follows is raw deflate. No trailer is ever sent:
#: a stream ends only when its connection does
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

#: compact JSON as bytes, a fraction of the json module's cost per event (no encoder made per call);
#: the broker's events hold strings, numbers, lists and maps only
_json = msgspec.json.Encoder()
_encode = _json.encode
#: a run of events as JSON lines, one encoder call (JSON text holds no raw newline: a line per event)
_encode_lines = _json.encode_lines
_seq = itemgetter("seq")


def sse(seq: int | None, topic: str, data) -> bytes:
    """One Server-Sent Event: ``id: SEQ``, ``event: TOPIC``, ``data: JSON`` (UTF-8)."""
    try:
        body = _encode(data)
    except (TypeError, ValueError):  # numpy values and the like: rare, so converted only when met
        body = _encode(to_json(data))
    if seq is None:
        return b"event: %s\ndata: %s\n\n" % (topic.encode(), body)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, topic.encode(), body)


def sse_run(topic: str, events: list) -> bytes:
    """Events of one topic, in order, as SSE bytes, with no Python step per event: their JSON lines
    in one encoder call become one format string (each line's end the next event's ``id:`` and
    ``event:`` lines; a ``%`` in the JSON doubled), filled with the seqs by one ``%``."""
    if not events:
        return b""
    try:
        lines = _encode_lines(events)
    except (TypeError, ValueError):  # numpy values and the like: rare, so converted only when met
        return b"".join([sse(ev["seq"], topic, ev) for ev in events])
    head = b"id: %%d\nevent: %s\ndata: " % topic.encode().replace(b"%", b"%%")
    if b"%" in lines:
        lines = lines.replace(b"%", b"%%")
    try:
        seqs = tuple(map(getter(events, "seq"), events))
    except AttributeError:  # records and maps in one run (not made here: a caller's): both read as maps
        seqs = tuple(map(_seq, events))
    return (head + lines[:-1].replace(b"\n", b"\n\n" + head) + b"\n\n") % seqs


def sse_runs(runs) -> bytes:
    """Runs ``(topic, [event])`` as SSE bytes, a run per encoder call."""
    return b"".join([sse_run(topic, events) for topic, events in runs])


def deflated(data: bytes) -> bytes:
    """``data`` as a self-contained deflate segment: it follows any other such segment in a stream."""
    if not data:
        return b""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header takes gzip (browsers' EventSource sends one that does)."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            if not q.startswith("q=") or _weight(q[2:]) > 0:
                return True
    return False


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


class Batch:
    """Events sent to every stream at once, as the same bytes (encoded, joined and compressed once)."""

    __slots__ = ("runs", "first", "last", "data", "size", "kind", "_gzip")

    def __init__(self, data: bytes, first: int | None, last: int | None, runs: list = (), kind: str = "events") -> None:
        self.runs = runs  #: [(topic, [event])]: what ``data`` holds, for a stream that had part of it
        self.first, self.last = first, last
        self.data = data
        self.size = len(data)
        #: "events"; "snapshot" (sent to everyone, and what follows continues from its seq); "note" (sent to everyone)
        self.kind = kind
        self._gzip: bytes | None = None

    @classmethod
    def of(cls, runs: list) -> "Batch":
        """Runs ``(topic, [event])`` of consecutive seqs, encoded (a run per encoder call) and joined."""
        return cls(sse_runs(runs), runs[0][1][0]["seq"], runs[-1][1][-1]["seq"], runs)

    def gzipped(self) -> bytes:
        """``data`` as a deflate segment, made for the first gzip stream that takes it."""
        if self._gzip is None:
            self._gzip = deflated(self.data)
        return self._gzip

    def after(self, seq: int) -> bytes:
        """The events past ``seq`` only (a stream that joined within this batch: rare)."""
        return b"".join([sse_run(topic, kept) for topic, events in self.runs
                         if (kept := [ev for ev in events if ev["seq"] > seq])])


class Stream:
    """One reader's bounded buffer of batches; ``dropped`` once it overflows. ``gzip``: what it
    takes is compressed (deflate segments, the stream's gzip header sent before them)."""

    def __init__(self, after: int | None, limit_bytes: int = STREAM_BUFFER_BYTES, gzip: bool = False) -> None:
        self.after = after  #: seq of the last event this reader has (or its snapshot's)
        self.limit_bytes = limit_bytes
        self.gzip = gzip
        self.batches: deque = deque()
        self.size = 0  #: as SSE text: what the bound counts
        self.dropped = False
        self._wakeup = asyncio.Event()

    def put(self, batch: Batch) -> bool:
        if self.dropped:
            return False
        if self.size + batch.size > self.limit_bytes:
            self.dropped = True  # fallen behind: disconnected, never buffered forever
            self.batches.clear()
            self._wakeup.set()
            return False
        self.batches.append(batch)
        self.size += batch.size
        self._wakeup.set()
        return True

    def take(self) -> bytes:
        """What is waiting, as this stream sends it: events after ``after`` only (a whole batch as
        it is, shared, no copy)."""
        parts = []
        gzip = self.gzip
        while self.batches:
            batch = self.batches.popleft()
            self.size -= batch.size
            if batch.kind != "events" or self.after is None or batch.first > self.after:
                parts.append(batch.gzipped() if gzip else batch.data)
                if batch.kind != "note":
                    self.after = batch.last
            elif batch.last > self.after:
                text = batch.after(self.after)
                parts.append(deflated(text) if gzip else text)
                self.after = batch.last
        self._wakeup.clear()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encode(self, text: bytes) -> bytes:
        """Text of this stream's own (its first chunk, a keep-alive) as it sends it."""
        return deflated(text) if self.gzip else text

    async def wait(self, timeout_s: float) -> None:
        if not self.batches and not self.dropped:
            try:
                async with asyncio.timeout(timeout_s):  # no task made per wait, as wait_for does
                    await self._wakeup.wait()
            except TimeoutError:
                pass


__all__ = ["Batch", "Stream", "sse", "sse_run", "sse_runs", "deflated", "accepts_gzip", "GZIP_HEADER",
           "STREAM_BUFFER_BYTES"]
