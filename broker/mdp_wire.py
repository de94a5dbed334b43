"""The 7/MDP and 8/MMI vocabulary: Majordomo commands, MMI answers, and how a Majordomo body
becomes a task's arguments or result and back (see broker/mdp.py for the bridge itself)."""

from __future__ import annotations

import enum

import numpy as np

from broker.protocol import MAX_NAME_LEN, ProtocolError, frame_buffer, unpack_value


class MdpCommand(enum.IntEnum):
    """MDP/Worker commands, one byte on the wire. B: broker, W: worker."""

    READY = 1  #: W->B register for one service
    REQUEST = 2  #: B->W one request: client address, empty frame, body
    REPLY = 3  #: W->B the answer: the same client address, empty frame, body
    HEARTBEAT = 4  #: both ways, proof of life
    DISCONNECT = 5  #: both ways, the end of the conversation


MDP_COMMANDS = {bytes([c]): c for c in MdpCommand}

#: services in this namespace are answered by the broker itself (8/MMI); workers may not register them
MMI_PREFIX = b"mmi."
#: the one MMI service implemented: is any live worker serving the service named in the body?
MMI_SERVICE = b"mmi.service"
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"

#: frames that the bridge sends as they are
EMPTY = b""
REQUEST = bytes([MdpCommand.REQUEST])
HEARTBEAT = bytes([MdpCommand.HEARTBEAT])
DISCONNECT = bytes([MdpCommand.DISCONNECT])


# ==================================================================== bodies


def as_arrays(frames: list) -> list:
    """Body frames as read-only uint8 arrays over the received bytes: no copy."""
    return [np.frombuffer(frame_buffer(f), np.uint8) for f in frames]


def frames_of(value) -> list:
    """A task result as reply frames: a list of frames, or one frame, or None for an empty body."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [frame(item) for item in items]


def request_body(blob, frames: list) -> list:
    """A task's arguments as request frames: positional only, one frame each."""
    value = unpack_value(blob, frames)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)):
        raise ProtocolError("arguments are not [args, kwargs]")
    args, kwargs = value
    if kwargs:
        raise ValueError(f"MDP requests take positional frames only, got keywords {sorted(kwargs)}")
    return [frame(a) for a in args]


def frame(item):
    if isinstance(item, (bytes, bytearray, memoryview)):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, np.ndarray) and item.dtype.kind in "biufc":
        if item.flags.c_contiguous or item.flags.f_contiguous:
            return memoryview(item.reshape(-1, order="A").view(np.uint8))  # zero copy, memory order
        return item.tobytes()
    raise ValueError(f"a {type(item).__name__} cannot be an MDP frame: use bytes, str or numeric numpy arrays")


def service_name(service: bytes) -> str:
    try:
        name = service.decode()
    except UnicodeDecodeError:
        raise ValueError(f"service name {service[:64]!r} is not UTF-8 text") from None
    if not name or len(name) > MAX_NAME_LEN:
        raise ValueError(f"service name must be 1 to {MAX_NAME_LEN} characters")
    return name


def worker_name(wid: bytes) -> str:
    """The name an MDP worker has in events and status; one per socket, as MDP has no names."""
    return f"mdp-{wid.hex()}"
