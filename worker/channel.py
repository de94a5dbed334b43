"""Messages between a worker and its child processes: msgpack headers with raw frames, no pickle.

One message on the socket pair is

    u32 header length | u32 frame count | u64 length per frame | header (msgpack) | frames

so arrays travel as their bytes, and a reader that pulls in whatever is there
parses every complete message at once (results of many short tasks in one read).
"""

from __future__ import annotations

import socket
import struct
from collections import deque

import msgpack

from broker.protocol import frame_buffer

_PREFIX = struct.Struct("<II")
#: bytes asked of the socket per read while no large message is expected: under glibc's mmap
#: threshold (128 KiB), or every read maps and unmaps its buffer (~20 us a read on the test box,
#: and a TLB shootdown across the worker's threads)
READ_CHUNK = 64 * 1024
#: buffers handed to one sendmsg call (the kernel takes at most IOV_MAX, 1024 on Linux)
MAX_PARTS = 512


class ChannelClosed(EOFError):
    """The other end closed its socket or died."""


class Channel:
    """One end of a worker <-> child socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._need = _PREFIX.size  #: bytes the next message needs in the buffer, at least
        self._ready: deque = deque()
        self._pack = msgpack.Packer().pack  #: writes are serialised by the channel's one writer (or its lock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, header, frames=()) -> None:
        """Write one message whole (blocks until the kernel took it)."""
        self.send_all([(header, frames)])

    def send_all(self, messages: list) -> None:
        """Write several messages [(header, frames)] whole, in one go (one wakeup for the reader)."""
        if all(not frames for _, frames in messages):  # headers alone (no-op traffic): one buffer, one call
            out = bytearray()
            for header, _ in messages:
                blob = self._pack(header)
                out += _PREFIX.pack(len(blob), 0)
                out += blob
            if out:
                self.sock.sendall(out)
            return
        parts = []
        for header, frames in messages:
            views = [memoryview(frame_buffer(f)).cast("B") for f in frames]
            blob = self._pack(header)
            head = _PREFIX.pack(len(blob), len(views)) + struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views)) + blob
            parts += [memoryview(head), *(v for v in views if v.nbytes)]
        while parts:
            sent = self.sock.sendmsg(parts[:MAX_PARTS])
            while parts and sent >= parts[0].nbytes:
                sent -= parts[0].nbytes
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]

    def read_available(self) -> list:
        """One read of what the socket holds (blocks if nothing does): every message now complete."""
        self._read()
        return self._take_ready()

    def read_nowait(self) -> list:
        """What the socket holds now, without waiting: every message complete (maybe none)."""
        try:
            self._read(socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        return self._take_ready()

    def _take_ready(self) -> list:
        out = list(self._ready)
        self._ready.clear()
        return out

    def _read(self, flags: int = 0) -> None:
        chunk = self.sock.recv(max(READ_CHUNK, self._need - len(self._buf)), flags)
        if not chunk:
            raise ChannelClosed("the other end of the channel closed")
        self._buf += chunk
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        start = 0
        while len(buf) - start >= _PREFIX.size:
            hlen, count = _PREFIX.unpack_from(buf, start)
            lens_at = start + _PREFIX.size
            if len(buf) - lens_at < 8 * count:
                self._need = lens_at + 8 * count - start
                break
            lens = struct.unpack_from(f"<{count}Q", buf, lens_at)
            body_at = lens_at + 8 * count
            end = body_at + hlen + sum(lens)
            if len(buf) < end:
                self._need = end - start
                break
            with memoryview(buf) as view:
                header = msgpack.unpackb(view[body_at:body_at + hlen], strict_map_key=False)
                frames, at = [], body_at + hlen
                for n in lens:
                    frames.append(bytes(view[at:at + n]))
                    at += n
            self._ready.append((header, frames))
            start = end
            self._need = _PREFIX.size
        if start:
            del buf[:start]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected socket pair with room for large writes."""
    a, b = socket.socketpair()
    for s in (a, b):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
            except OSError:
                pass
    return a, b
