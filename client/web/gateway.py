"""The gateway's working parts, started and stopped with the app: its broker client, the event hub,
the window of recent tasks and the metrics. Every wait on the broker has a deadline."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from broker.logs import get_logger
from broker.protocol import DEFAULT_EVENTS, DEFAULT_FRONTEND, EncodeError
from client.errors import BrokerUnavailable, GridqError, TaskError
from client.state import SILENT_AFTER_S
from client.web.auth import Tokens
from client.web.events import FLOOD_WAIT_S, EventHub
from client.web.records import read_records
from client.web.metrics import Metrics
from client.web.models import TaskSpec
from client.web.tasks import DEFAULT_WINDOW, TaskWindow

from client.aio import AsyncClient, AsyncFuture
from client.aio_io import PENDING
from client.follow import follow_batches

log = get_logger(__name__)

#: how long an HTTP request waits for the broker before answering 503
BROKER_WAIT_S = 5.0
#: submit() options: a task's kwargs of these names cannot pass through the Python API
SUBMIT_OPTIONS = frozenset({"name", "resources", "priority", "retries", "timeout", "key", "retry_on", "backoff"})


class ApiError(Exception):
    """An HTTP error answer: ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message


def unavailable(exc: Exception | None = None) -> ApiError:
    return ApiError(503, "BrokerUnavailable", f"the broker did not answer in time{f': {exc}' if exc else ''}")


@dataclass
class Config:
    broker: str = DEFAULT_FRONTEND
    events: str = DEFAULT_EVENTS
    tokens: Tokens | None = None
    max_body_bytes: int = 16 << 20
    broker_key: str | None = None
    curve_secret: str | None = None
    broker_wait_s: float = BROKER_WAIT_S
    window: int = DEFAULT_WINDOW
    https: bool = False


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.window = TaskWindow(config.window)
        self.client = None
        self.hub: EventHub | None = None

    async def start(self) -> None:
        c = self.config
        # the broker gives up on a request after timeout * (retries + 1): keep that near our own deadline
        self.client = GatewayClient(c.broker, timeout=max(c.broker_wait_s / 2, 0.5), retries=1, broker_key=c.broker_key,
                                  secret=c.curve_secret, cancel_on_close=False)
        self.hub = EventHub(lambda: follow_batches(self.client, c.events, FLOOD_WAIT_S, read_records), self.client.status,
                            on_events=self.window.notice, on_clear=self.window.ring_cleared, metrics=self.metrics)
        self.window.follow(self.hub.ring)  # the window takes the stream's tasks from the ring when read
        self.hub.start()
        log.info("gateway_started", broker=c.broker, events=c.events)

    async def stop(self) -> None:
        if self.hub is not None:
            await self.hub.close()
        if self.client is not None:
            await self.client.close()

    async def ask(self, awaitable):
        """Await something of the broker's, or ApiError 503 once the deadline passes."""
        try:
            return await asyncio.wait_for(awaitable, self.config.broker_wait_s)
        except (asyncio.TimeoutError, BrokerUnavailable) as exc:
            raise unavailable(exc if isinstance(exc, BrokerUnavailable) else None) from None

    async def status(self) -> dict:
        return await self.ask(self.client.status())

    async def healthy(self) -> tuple[bool, str]:
        hub = self.hub
        if hub.link == "live" and time.monotonic() - hub.heard_at < SILENT_AFTER_S:
            return True, "answers"
        try:
            await self.status()
        except ApiError as exc:
            return False, exc.message
        except GridqError as exc:
            return False, str(exc)
        return True, "answers"

    async def submit(self, tasks: list[TaskSpec], batch: bool) -> list[str]:
        """Submit and wait until the broker accepted every task (journaled, where it keeps a journal).
        One bad task refuses them all: every task is checked and packed before any is queued."""
        where = (lambda index: f"body[{index}]") if batch else (lambda index: "body")
        for index, t in enumerate(tasks):
            clash = SUBMIT_OPTIONS.intersection(t.kwargs) if t.kwargs else None
            if clash:
                raise ApiError(422, "ValidationError", f"{where(index)}.kwargs.{min(clash)}: a keyword argument of "
                                                       "this name cannot be passed (it is a submit option)")
        try:
            futures, accepted = self.client.submit_batch(tasks)
        except BadTask as exc:
            raise ApiError(422, "ValidationError", f"{where(exc.index)}.args: cannot be sent to a worker: "
                                                   f"{exc.__cause__}") from None
        self.window.submitted(futures, tasks)
        async with self.hub.hold():  # the acceptance first; the events of the tasks can wait a moment
            await self.ask(accepted)
        for index, f in enumerate(futures):
            if f._accept is not None:  # refused: the first one in order answers
                raise refusal(f._accept, where(index)) from None
        return [f.task_id for f in futures]

    async def cancel(self, task_id: str, terminate: bool) -> bool:
        return bool(await self.ask(self.client.cancel(task_id, terminate=terminate)))


class BadTask(ValueError):
    """A task of a batch that cannot be sent (its ``index``; the reason is its ``__cause__``)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class Acceptance:
    """A batch's acceptance: one asyncio future that resolves once the broker has answered for every
    task (accepted or refused), not a future per task and a gather of them."""

    __slots__ = ("left", "done")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.left = count
        self.done = loop.create_future()

    def answered(self) -> None:
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)


class BatchFuture(AsyncFuture):
    """An AsyncFuture whose acceptance counts towards its batch's."""

    __slots__ = ("_batch",)

    def __init__(self, client: "GatewayClient", task_id: str, loop: asyncio.AbstractEventLoop, batch: Acceptance) -> None:
        super().__init__(client, task_id, loop)
        self._batch = batch

    def _set_accepted(self, error: Exception | None) -> None:
        if self._accept is PENDING:
            super()._set_accepted(error)
            self._batch.answered()


class GatewayClient(AsyncClient):
    """The gateway's AsyncClient: a 10,000-task POST goes out in 5 SUBMITs, not 20, so its acceptance
    takes 2 round trips (4 in flight), not 5; encoding one takes ~10 ms of the loop, fine here.
    ``submit_batch`` submits a POST's tasks at once: each packed once, all or none queued."""

    SUBMIT_BATCH = 2000
    DEFER_ACCEPTED_MS = 0  #: a POST answers once its tasks are accepted: never later

    def submit_batch(self, tasks: list[TaskSpec]) -> tuple[list[BatchFuture], asyncio.Future]:
        """Queue ``tasks`` (all sent with the next flush); returns their futures and one future that
        resolves once the broker has answered for all of them (each future's ``_accept`` then says
        None, accepted, or the error that refused it). BadTask, and nothing queued, where one of them
        cannot be sent."""
        loop = self._start()
        engine = self._engine
        made = []
        for index, t in enumerate(tasks):
            try:
                made.append(engine.make_task(t.task, t.args, t.kwargs, resources=t.resources, priority=t.priority,
                                             retries=t.retries, timeout=t.timeout, key=t.key))
            except (EncodeError, ValueError, TypeError, OverflowError) as exc:
                raise BadTask(index) from exc
        acceptance = Acceptance(len(made), loop)
        futures = []
        for record, frames in made:
            future = BatchFuture(self, record.task_id, loop, acceptance)
            engine.submit(future, record, frames)
            futures.append(future)
        self._send_submitted()
        return futures, acceptance.done


def refusal(exc: BaseException, where: str) -> ApiError:
    """The HTTP answer for a task the broker did not accept."""
    if isinstance(exc, BrokerUnavailable):
        return unavailable(exc)
    text = str(exc).lower()
    # KeyConflict comes with issue 17; until then a refusal that says the key is taken means the same
    if type(exc).__name__ == "KeyConflict" or "key" in text and any(w in text for w in ("conflict", "taken", "in use")):
        return ApiError(409, "KeyConflict", f"{where}.key: {exc}")
    if isinstance(exc, TaskError):
        return ApiError(422, exc.type, f"{where}: the broker refused the task: {exc.message}")
    return ApiError(503, type(exc).__name__, f"{where}: {exc}")


__all__ = ["Gateway", "Config", "ApiError", "unavailable", "refusal", "BROKER_WAIT_S"]
