"""The broker's three flood topics (task.submitted, started, succeeded) decoded as compact records.

A no-op task makes three events, and every one is decoded, kept in the hub's ring and encoded to
JSON for the streams: decoded into the broker's own event Structs (broker/events.py: one definition
of each shape for both ends) it takes half a dict's time, encodes faster, is freed faster and is not
tracked by the garbage collector. A record reads like the map it came as (``ev["seq"]``,
``ev.get("worker")``) and encodes to the same JSON, its fields in the broker's order. A message of
another shape (a field more or fewer, a value of another type) is decoded as maps, as before:
nothing is lost, it is only slower.
"""

from __future__ import annotations

from operator import attrgetter, itemgetter

import msgspec

from broker.events import Started, Submitted, Succeeded, TaskEvent
from broker.protocol import read_events


#: what the gateway calls a decoded task event: the broker's own event Structs (broker/events.py)
Record = TaskEvent

_DECODERS = {kind.topic.encode(): msgspec.msgpack.Decoder(kind | list[kind]).decode
             for kind in (Submitted, Started, Succeeded)}


def read_records(topic: bytes, body) -> list:
    """The events of one message (``topic``'s): records where the topic has one and the message
    fits it, else maps (``broker.protocol.read_events``: a bad body raises ProtocolError)."""
    decode = _DECODERS.get(topic)
    if decode is not None:
        try:
            value = decode(body)
        except msgspec.MsgspecError:  # not of the record's shape (or not msgpack): as maps, or the error
            return read_events(body)
        return value if type(value) is list else [value]
    return read_events(body)


def getter(events: list, key: str):
    """A getter of ``key`` for the events of one run (all records or all maps): attrgetter for
    records (itemgetter would go through ``__getitem__``: three times the cost)."""
    return attrgetter(key) if isinstance(events[0], Record) else itemgetter(key)


__all__ = ["Record", "Submitted", "Started", "Succeeded", "read_records", "getter"]
