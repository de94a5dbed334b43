"""gridq's Python client: submit tasks to a broker and get futures back."""

from concurrent.futures import CancelledError

try:
    from broker.protocol import EncodeError
except ImportError as exc:  # a module of the user's named like ours, found first on sys.path
    from client.shadowed import explain

    raise explain(exc, "client") from exc
from client.aio import AsyncClient, AsyncFuture
from client.client import Client, GridFuture
from client.errors import BrokerUnavailable, GridqError, KeyConflict, TaskError, TaskLost, TaskTimeout

__all__ = ["Client", "GridFuture", "AsyncClient", "AsyncFuture", "TaskError", "TaskLost", "TaskTimeout",
           "BrokerUnavailable", "KeyConflict", "GridqError", "EncodeError", "CancelledError"]
