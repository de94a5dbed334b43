"""gridq's Python client: submit tasks to a broker and get futures back."""

from concurrent.futures import CancelledError

from broker.protocol import EncodeError
from client.aio import AsyncClient, AsyncFuture
from client.client import Client, GridFuture
from client.errors import BrokerUnavailable, GridqError, KeyConflict, TaskError, TaskLost, TaskTimeout

__all__ = ["Client", "GridFuture", "AsyncClient", "AsyncFuture", "TaskError", "TaskLost", "TaskTimeout",
           "BrokerUnavailable", "KeyConflict", "GridqError", "EncodeError", "CancelledError"]
