"""``AsyncClient.events``: the ZeroMQ guide's Clone pattern over a zmq.asyncio SUB socket, on the caller's loop.

``ClusterState`` decides what each event means for readers (client/state.py); this module only
feeds it: the socket, and the snapshot requests, during which the socket is still read.
"""

from __future__ import annotations

import asyncio
from operator import itemgetter
from typing import AsyncIterator

import zmq
import zmq.asyncio

from broker.protocol import Command
from client.errors import GridqError
from client.state import ClusterState, subscriber

#: events in one read from which the stream counts as a flood (a trickle is read as it comes)
FLOOD_EVENTS = 64


async def follow(client, prefix: str, address: str) -> AsyncIterator[dict]:
    """``AsyncClient.events``: every event whose topic starts with ``prefix`` as a dict with its
    ``topic``; a ``{"topic": "snapshot", "seq", "snapshot", "missed"}`` item first and after a break."""
    async for batch in follow_batches(client, address):
        for topic, events in batch:
            if topic.startswith(prefix) or topic == "snapshot":
                for fields in events:
                    yield {"topic": topic, **fields}


async def follow_batches(client, address: str, flood_wait_s: float = 0.0,
                         decode=None) -> AsyncIterator[list[tuple[str, list[dict]]]]:
    """The broker's events as they come, per read a list of runs of one topic, ``(topic,
    [fields])`` (a message's events as the broker sent them, no copy, no per-event step of the
    caller's): snapshot items as ``("snapshot", [{"seq", "snapshot", "missed"}])``. The socket is
    read while a snapshot is fetched: what comes meanwhile is held and follows it. Only the
    stream is followed (no model): a snapshot is asked for at the start, after a gap or a
    restart, and when the broker falls silent. ``flood_wait_s``: after a read of ``FLOOD_EVENTS`` or
    more, the socket is left to gather for that long before it is polled again: in a flood, a read
    a tick instead of a loop turn per broker message; a trickle still comes at once. ``decode``:
    what a message's events are made from its topic and body (``StreamState.decode``)."""
    state = ClusterState(client, address, model=False, decode=decode)
    sock = subscriber(zmq.asyncio.Context.shadow(client._ctx.underlying), address, client._security)
    sync_sock = zmq.Socket.shadow(sock.underlying)  # never waits: the asyncio socket is for poll()
    asking: asyncio.Future | None = None  #: the snapshot request in flight
    try:
        # a SUB connects asynchronously: wait (briefly) for a first event, so the subscription
        # is live before the snapshot and nothing falls between them
        await sock.poll(state.silent_after_s * 1000 / 2)
        while not client._closed:
            if asking is None and state.due():
                asking = asyncio.ensure_future(client._call(Command.STATUS, {}))  # the header: with the broker's boot
            if asking is not None and asking.done():
                batch = _snapshot_taken(state, asking)
                asking = None
                if batch:
                    yield batch
                continue
            wait_s = 0.1 if state.stale else state.silent_after_s / 2
            if await _readable(sock, wait_s, asking):
                batch = state.read(sync_sock)
                if batch:
                    yield batch
                    if flood_wait_s and sum(map(len, map(itemgetter(1), batch))) >= FLOOD_EVENTS:
                        await asyncio.sleep(flood_wait_s)
            state.check_silence()
    finally:
        if asking is not None:
            asking.cancel()
            if asking.done() and not asking.cancelled():
                asking.exception()  # retrieved: a request that failed as we left is no error of anyone's
        sock.close(linger=0)


def _snapshot_taken(state: ClusterState, asking: asyncio.Future) -> list[tuple[str, list[dict]]]:
    """What readers get once a snapshot request ends: nothing (it failed; asked again later), or
    the snapshot where the stream broke, then the held events after it."""
    try:
        reply = asking.result()
    except (GridqError, asyncio.TimeoutError, asyncio.CancelledError) as exc:
        state.unreachable(exc)
        return []
    snap = reply["snapshot"]
    broke = state.broken is not None
    held = [(topic, [fields]) for topic, fields in state.load(snap, boot=reply.get("boot"))]
    if broke:  # one asked for the broker's silence only, with the stream whole, costs readers nothing
        held.insert(0, ("snapshot", [{"seq": snap["seq"], "snapshot": snap, "missed": state.missed or {}}]))
    return held


async def _readable(sock, wait_s: float, asking: asyncio.Future | None) -> bool:
    """Wait until ``sock`` has input (True), or ``wait_s`` pass, or ``asking`` is answered."""
    if asking is None:
        return bool(await sock.poll(wait_s * 1000))
    polling = asyncio.ensure_future(sock.poll(wait_s * 1000))
    await asyncio.wait((polling, asking), return_when=asyncio.FIRST_COMPLETED)
    if not polling.done():
        polling.cancel()
        return False
    return bool(polling.result())


__all__ = ["follow", "follow_batches", "FLOOD_EVENTS"]
