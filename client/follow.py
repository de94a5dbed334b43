"""``AsyncClient.events``: the ZeroMQ guide's Clone pattern over a zmq.asyncio SUB socket, on the caller's loop.

``ClusterState`` decides what each event means for readers (client/state.py); this module only
feeds it: the socket, and the snapshot requests, during which the socket is still read.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import zmq
import zmq.asyncio

from broker.protocol import Command
from client.errors import GridqError
from client.state import ClusterState, subscriber


async def follow(client, prefix: str, address: str) -> AsyncIterator[dict]:
    """``AsyncClient.events``: ClusterState's seq logic over a zmq.asyncio SUB socket. The socket
    is read while a snapshot is being fetched: what comes meanwhile is held and follows it."""
    state = ClusterState(client, address)
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
                for item in _snapshot_taken(state, asking, prefix):
                    yield item
                asking = None
                continue
            wait_s = 0.1 if state.stale else state.silent_after_s / 2
            if await _readable(sock, wait_s, asking):
                for topic, fields in state.read(sync_sock):
                    if topic.startswith(prefix):
                        yield {"topic": topic, **fields}
            state.check_silence()
    finally:
        if asking is not None:
            asking.cancel()
            if asking.done() and not asking.cancelled():
                asking.exception()  # retrieved: a request that failed as we left is no error of anyone's
        sock.close(linger=0)


def _snapshot_taken(state: ClusterState, asking: asyncio.Future, prefix: str) -> list[dict]:
    """What readers get once a snapshot request ends: nothing (it failed; asked again later), or
    the snapshot where the stream broke, then the held events after it."""
    try:
        reply = asking.result()
    except (GridqError, asyncio.TimeoutError, asyncio.CancelledError) as exc:
        state.unreachable(exc)
        return []
    snap = reply["snapshot"]
    broke = state.broken is not None
    held = state.load(snap, boot=reply.get("boot"))
    out = []
    if broke:  # a model that only resynced for itself loses readers nothing: no snapshot for them
        out.append({"topic": "snapshot", "seq": snap["seq"], "snapshot": snap, "missed": state.missed or {}})
    out.extend({"topic": topic, **fields} for topic, fields in held if topic.startswith(prefix))
    return out


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


__all__ = ["follow"]
