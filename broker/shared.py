"""What the broker's peers share with it beyond the wire format: sending and receiving multipart
messages at little cost, the waker that lets threads interrupt a poll loop, and the client side of
CURVE. Clients and workers import ``broker.protocol`` and this module of the broker, nothing else
(see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import os
from typing import Iterator

import zmq
import zmq.auth
import zmq.backend

# pyzmq's send_multipart/recv_multipart are Python wrappers that cost more than the messages of a
# lone round trip themselves (enum flag arithmetic, type checks, a Frame object for every small
# part sent zero-copy): about 20 us a message on a 2-core machine. Every gridq peer sends through
# these two instead, on the backend socket's own methods.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = NOBLOCK = int(zmq.NOBLOCK)  #: zmq.NOBLOCK as a plain int (no enum arithmetic per part)
#: parts shorter than this are copied (what pyzmq does anyway); longer ones and received Frames
#: go zero-copy where the caller allows it
COPY_BELOW = zmq.COPY_THRESHOLD


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0, zero_copy: bool = True) -> None:
    """``sock.send_multipart(frames, flags, copy=not zero_copy)``, at a fraction of its cost. With
    ``zero_copy`` False every part is copied (no pyzmq garbage-collector thread is started)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = flags | _SNDMORE if i < last else flags
        if zero_copy and not (type(frame) is bytes and len(frame) < COPY_BELOW):
            _send(sock, frame, more, False)
        else:
            _send(sock, frame, more)


def send_pair(sock: zmq.Socket, first: bytes, second: bytes) -> None:
    """A two-part message of small ``bytes``, both copied: an event's topic and body."""
    _send(sock, first, _SNDMORE)
    _send(sock, second, 0)


def recv_pair(sock: zmq.Socket) -> tuple[bytes, bytes]:
    """A two-part message of small parts, both copied (an event's topic and body); raises zmq.Again
    where nothing waits. It asks nothing of RCVMORE, whose query (an enum conversion in pyzmq) costs
    more than both receives: a message of another length misaligns what follows it, so a caller
    that finds the parts malformed calls ``skip_rest`` to start again at a message's first part."""
    return _recv(sock, _NOBLOCK), _recv(sock, _NOBLOCK)


def skip_rest(sock: zmq.Socket) -> None:
    """Drop what is left of the message being received (nothing where its last part was taken)."""
    while _get(sock, _RCVMORE):
        _recv(sock, _NOBLOCK)


def recv_frames(sock: zmq.Socket) -> list:
    """``sock.recv_multipart(zmq.NOBLOCK, copy=False)``, at a fraction of its cost: a list of
    zmq.Frame; raises zmq.Again where nothing waits."""
    frame = _recv(sock, _NOBLOCK, False)
    parts = [frame]
    while frame.more:  # set by the receive itself: half the cost of asking the socket (RCVMORE)
        frame = _recv(sock, _NOBLOCK, False)
        parts.append(frame)
    return parts


def readable(sock: zmq.Socket) -> bool:
    """A message waits on ``sock`` (ZMQ_EVENTS): cheaper than a ``recv`` that raises zmq.Again, and
    it re-arms the socket's descriptor for an event loop that watches it."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def drain(sock: zmq.Socket, limit: int = 1 << 30) -> Iterator[list]:
    """The messages waiting on ``sock`` (at most ``limit``), each as ``recv_frames`` reads it. After
    each one ZMQ_EVENTS says whether another waits: a receive that raises zmq.Again to end the
    drain costs about four times as much (the exception is built and raised through pyzmq)."""
    for _ in range(limit):
        try:
            yield recv_frames(sock)
        except zmq.Again:
            return
        if not readable(sock):
            return


class Waker:
    """A pipe that lets threads wake a zmq.Poller loop (the poller watches its read end)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)

    def wake(self) -> None:
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # already full of wakeups, or closed while stopping

    def clear(self) -> None:
        try:  # one read takes every wakeup: a pipe holds at most 64 KiB, and wake() never blocks
            os.read(self.fd, 1 << 16)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.fd, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class CurveClient:
    """A client's or worker's key pair and the broker's public key."""

    def __init__(self, server_key: bytes, public: bytes, secret: bytes) -> None:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE support")
        self.server_key = server_key
        self.public = public
        self.secret = secret

    @classmethod
    def from_files(cls, broker_key: str | os.PathLike | None, secret: str | os.PathLike | None) -> "CurveClient":
        """``broker_key``: the broker's ``.key`` file; ``secret``: own ``.key_secret`` file."""
        if not broker_key or not secret:
            raise ValueError("CURVE needs both the broker's public key file (broker_key / --broker-key) "
                             "and your own secret key file (secret / --curve-secret)")
        server_key, _ = zmq.auth.load_certificate(broker_key)
        public, secret_key = load_pair(secret, "secret")
        return cls(server_key, public, secret_key)

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the broker."""
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def load_pair(path: str | os.PathLike, what: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{what} {path}: holds no secret key (pass the NAME.key_secret file, not NAME.key)")
    return public, secret
