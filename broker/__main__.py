"""gridq-broker: run a broker (python -m broker)."""

from __future__ import annotations

import argparse
import signal
import sys

import structlog

from broker.logs import add_logging_flags, configure_logging
from broker.protocol import DEFAULT_BACKEND, DEFAULT_EVENTS, DEFAULT_FRONTEND
from broker.runtime import tune_gc
from broker.server import Broker, BrokerConfig

log = structlog.get_logger("broker")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridq-broker", description="Run a gridq broker.")
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="client endpoint (ROUTER)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="worker endpoint (ROUTER)")
    p.add_argument("--events", default=DEFAULT_EVENTS, help="event endpoint (PUB)")
    p.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS", help="heartbeat interval")
    p.add_argument("--liveness", type=int, default=3, metavar="N", help="missed heartbeats before a worker is dead")
    p.add_argument("--max-retries", type=int, default=3, metavar="N", help="times a task may lose its worker")
    p.add_argument("--journal", default=None, metavar="PATH", help="SQLite journal that survives restarts")
    p.add_argument("--result-ttl", type=float, default=3600.0, metavar="SECONDS", help="keep unfetched results this long")
    p.add_argument("--no-worker-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="fail a task no connected worker could ever serve after this long")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30, metavar="BYTES", help="largest message accepted")
    p.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="the broker's CURVE key pair (NAME.key_secret from gridq-keygen); turns CURVE on")
    p.add_argument("--client-keys", default=None, metavar="DIR", help="public keys (*.key) of allowed clients")
    p.add_argument("--worker-keys", default=None, metavar="DIR", help="public keys (*.key) of allowed workers")
    add_logging_flags(p)
    args = p.parse_args(argv)
    if args.heartbeat <= 0 or args.liveness < 1 or args.max_retries < 0 or args.no_worker_timeout < 0:
        p.error("--heartbeat must be > 0, --liveness >= 1, --max-retries and --no-worker-timeout >= 0")
    if args.max_message_bytes < 1024:
        p.error("--max-message-bytes must be at least 1024")
    curve = (args.curve_secret, args.client_keys, args.worker_keys)
    if any(curve) and not all(curve):
        p.error("CURVE needs all three of --curve-secret, --client-keys and --worker-keys")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    config = BrokerConfig(frontend=args.frontend, backend=args.backend, events=args.events,
                          heartbeat_s=args.heartbeat, liveness=args.liveness, max_retries=args.max_retries,
                          journal=args.journal, result_ttl_s=args.result_ttl,
                          no_worker_timeout_s=args.no_worker_timeout, max_message_bytes=args.max_message_bytes)
    security = None
    try:
        if args.curve_secret:
            from broker.security import CurveServer

            security = CurveServer.from_files(args.curve_secret, args.client_keys, args.worker_keys)
        broker = Broker(config, security=security)
    except Exception as exc:  # bad endpoint, port in use, unreadable journal or keys
        log.error("broker_start_failed", error=str(exc))
        if security is not None:
            security.stop()
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    if security is not None:
        signal.signal(signal.SIGHUP, lambda *_: security.reload())
    tune_gc()
    try:
        broker.run()
    finally:
        if security is not None:
            security.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
