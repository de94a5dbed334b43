"""Old home of the Waker, which now lives in broker/shared.py (client/client.py and
worker/executors.py import it from here until their rewrites land)."""

from broker.shared import Waker  # noqa: F401
