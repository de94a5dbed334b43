"""The gateway's working parts, started and stopped with the app: its broker client, the event hub,
the window of recent tasks and the metrics. Every wait on the broker has a deadline."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from broker.logs import get_logger
from broker.protocol import EncodeError, pack_value
from client.errors import BrokerUnavailable, GridqError, TaskError
from client.state import DEFAULT_EVENTS, SILENT_AFTER_S
from client.web.auth import Tokens
from client.web.events import EventHub
from client.web.metrics import Metrics
from client.web.models import TaskIn
from client.web.tasks import DEFAULT_WINDOW, TaskWindow

from client.aio import AsyncClient
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
    broker: str = "tcp://127.0.0.1:5555"
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
        self.hub = EventHub(lambda: follow_batches(self.client, c.events), self.client.status,
                            on_event=self.window.event, metrics=self.metrics)
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

    async def submit(self, tasks: list[TaskIn], batch: bool) -> list[str]:
        """Submit and wait until the broker accepted every task (journaled, where it keeps a journal)."""
        for index, t in enumerate(tasks):  # all checked before any is sent: one bad task refuses them all
            where = f"body[{index}]" if batch else "body"
            clash = SUBMIT_OPTIONS.intersection(t.kwargs)
            if clash:
                raise ApiError(422, "ValidationError", f"{where}.kwargs.{min(clash)}: a keyword argument of this "
                                                       "name cannot be passed (it is a submit option)")
            try:
                pack_value([t.args, t.kwargs])
            except (EncodeError, ValueError, TypeError, OverflowError) as exc:
                raise ApiError(422, "ValidationError", f"{where}.args: cannot be sent to a worker: {exc}") from None
        futures = []
        for t in tasks:
            futures.append(self.client.submit(t.task, *t.args, resources=t.resources, priority=t.priority,
                                              retries=t.retries, timeout=t.timeout, key=t.key, **t.kwargs))
        async with self.hub.hold():  # the acceptance first; the events of the tasks can wait a moment
            outcome = await self.ask(asyncio.gather(*(f.accepted for f in futures), return_exceptions=True))
        for f, t in zip(futures, tasks):
            self.window.submitted(f, t.task)
        for index, result in enumerate(outcome):
            if isinstance(result, BaseException):
                raise refusal(result, f"body[{index}]" if batch else "body") from None
        return [f.task_id for f in futures]

    async def cancel(self, task_id: str, terminate: bool) -> bool:
        return bool(await self.ask(self.client.cancel(task_id, terminate=terminate)))


class GatewayClient(AsyncClient):
    """The gateway's AsyncClient: a 10,000-task POST goes out in 5 SUBMITs, not 20, so its acceptance
    takes 2 round trips (4 in flight), not 5; encoding one takes ~10 ms of the loop, fine here."""

    SUBMIT_BATCH = 2000


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
