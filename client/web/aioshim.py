"""A stand-in for ``client.aio.AsyncClient`` (being written on another branch): the threaded
``Client`` behind the same asyncio contract, so the gateway is not blocked. Remove once
``AsyncClient`` lands; the gateway imports whichever exists (see ``client/web/gateway.py``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from broker.protocol import Command
from client.client import Client, GridFuture
from client.errors import GridqError, TaskError


class _Threaded(Client):
    """``Client`` that also reports which tasks the broker accepted."""

    def __init__(self, *args, on_accepted, **kwargs) -> None:
        self._on_accepted = on_accepted  # before super().__init__: its I/O thread starts there
        super().__init__(*args, **kwargs)

    def _on_reply(self, req, msg) -> None:
        super()._on_reply(req, msg)
        if msg.command is Command.ACCEPTED:
            refused = {task_id for task_id, _reason in msg.header.get("rejected", ())}
            self._on_accepted([t for t in req.task_ids if t not in refused])


class AsyncClient:
    """The subset of the AsyncClient contract the gateway uses: submit, cancel, status, close."""

    def __init__(self, address: str, *, timeout: float = 2.5, retries: int = 3, broker_key=None, secret=None,
                 cancel_on_close: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting: dict[str, asyncio.Future] = {}
        self._futures: dict[str, GridFuture] = {}
        self._client = _Threaded(address, timeout=timeout, retries=retries, broker_key=broker_key, secret=secret,
                                 on_accepted=self._accepted_from_thread)
        self._security = self._client._security

    def submit(self, name: str, *args, **options) -> asyncio.Future:
        inner = self._client.submit(name, *args, **options)
        outer = self._loop.create_future()
        outer.task_id, outer.info = inner.task_id, None
        outer.accepted = self._accepting[inner.task_id] = self._loop.create_future()
        self._futures[inner.task_id] = inner
        inner.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._settle, f, outer))
        return outer

    def _accepted_from_thread(self, task_ids: list) -> None:
        self._loop.call_soon_threadsafe(self._resolve_accepted, task_ids)

    def _resolve_accepted(self, task_ids: list) -> None:
        for task_id in task_ids:
            accepted = self._accepting.pop(task_id, None)
            if accepted is not None and not accepted.done():
                accepted.set_result(None)

    def _settle(self, inner: Future, outer: asyncio.Future) -> None:
        self._futures.pop(outer.task_id, None)
        outer.info = inner.info
        accepted = self._accepting.pop(outer.task_id, None)
        error = None if inner.cancelled() else inner.exception()
        if accepted is not None and not accepted.done():
            # a result (even a failure) came before the ACCEPTED reply: the broker had accepted it;
            # only a refusal, an error reply or silence mean it never did
            refused = isinstance(error, GridqError) and (not isinstance(error, TaskError) or error.type == "InvalidRequest")
            if refused:
                accepted.set_exception(error)
            else:
                accepted.set_result(None)
        if outer.done():
            return
        if inner.cancelled():
            outer.cancel()
        elif error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(inner.result())

    async def cancel(self, target, terminate: bool = False) -> bool:
        task_id = target if isinstance(target, str) else target.task_id
        inner = self._futures.get(task_id)
        if inner is None:
            return False  # the broker cancels only its own session's tasks
        return await asyncio.to_thread(self._client.cancel, inner)

    async def status(self) -> dict:
        return await asyncio.to_thread(self._client.status)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)


__all__ = ["AsyncClient", "GridqError"]
