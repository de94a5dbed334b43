"""gridq-web's command line: check the flags, then serve the app with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys

import structlog

from broker.logs import add_logging_flags, configure_logging
from broker.protocol import DEFAULT_EVENTS, DEFAULT_FRONTEND
from client.web.auth import Tokens, TokensError
from client.web.gateway import BROKER_WAIT_S, Config

#: allocations between two collections of the youngest generation (CPython's default: 700)
GC_YOUNG = 10_000

log = structlog.get_logger("client.web")

DEFAULT_LISTEN = "127.0.0.1:8080"
#: the gateway watches; the broker dispatches: under contention for CPU the broker goes first
DEFAULT_NICE = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridq-web", description="gridq's HTTP API and live web page")
    p.add_argument("--broker", default=DEFAULT_FRONTEND, metavar="ADDR", help="broker frontend (clients)")
    p.add_argument("--events", default=DEFAULT_EVENTS, metavar="ADDR", help="broker event (PUB) endpoint")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve HTTP [{DEFAULT_LISTEN}]; port 0 picks a free one")
    p.add_argument("--tokens", metavar="FILE", help="lines 'TOKEN ROLE', ROLE submit or read; needed off loopback")
    p.add_argument("--certfile", metavar="FILE", help="TLS certificate (PEM): serve HTTPS")
    p.add_argument("--keyfile", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument("--max-body", type=float, default=16.0, metavar="MiB", help="largest request body [16]")
    p.add_argument("--broker-key", metavar="FILE", help="the broker's CURVE public key")
    p.add_argument("--curve-secret", metavar="FILE", help="this gateway's CURVE key pair (secret file)")
    p.add_argument("--broker-wait", type=float, default=BROKER_WAIT_S, metavar="SECONDS",
                   help=f"how long a request waits for the broker before answering 503 [{BROKER_WAIT_S:g}]")
    p.add_argument("--nice", type=int, default=DEFAULT_NICE, metavar="N",
                   help=f"lower this process's CPU priority by N, so a broker and workers on the same machine come "
                        f"first and watching never slows dispatch [{DEFAULT_NICE}]; 0 keeps it")
    add_logging_flags(p)
    return p.parse_args(argv)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        host, port = split_listen(args.listen)
    except ValueError as exc:
        print(f"gridq-web: {exc}", file=sys.stderr)
        return 2
    tokens = None
    if args.tokens:
        try:
            tokens = Tokens.load(args.tokens)
        except TokensError as exc:
            print(f"gridq-web: {exc}", file=sys.stderr)
            return 2
    elif not is_loopback(host):
        print(f"gridq-web: refusing to listen on {host}: anything but loopback needs --tokens FILE "
              "(lines 'TOKEN ROLE'), or anyone who can reach it could submit tasks", file=sys.stderr)
        return 2
    if bool(args.certfile) != bool(args.keyfile):
        print("gridq-web: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    for path in (args.certfile, args.keyfile, args.broker_key, args.curve_secret):
        if path and not os.path.isfile(path):
            print(f"gridq-web: no such file: {path}", file=sys.stderr)
            return 2
    if args.max_body <= 0 or args.broker_wait <= 0 or not 0 <= args.nice <= 19:
        print("gridq-web: --max-body and --broker-wait must be positive, --nice in 0..19", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    config = Config(broker=args.broker, events=args.events, tokens=tokens, max_body_bytes=int(args.max_body * (1 << 20)),
                    broker_key=args.broker_key, curve_secret=args.curve_secret, broker_wait_s=args.broker_wait,
                    https=bool(args.certfile))
    return serve(config, host, port, args)


def serve(config: Config, host: str, port: int, args) -> int:
    import uvicorn

    from client.web.app import create_app

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"gridq-web: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    sock.listen(2048)  # connections wait in the backlog while the app starts: the address below works at once
    bound = sock.getsockname()[1]
    scheme = "https" if config.https else "http"
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    # the one line scripts and tests read to find the page; logs go to stderr
    print(f"gridq-web: serving on {scheme}://{shown}:{bound}/", flush=True)
    log.info("gateway_listening", url=f"{scheme}://{shown}:{bound}/", tokens=config.tokens is not None)
    uv = uvicorn.Config(create_app(config), log_level=logging.WARNING, access_log=False, lifespan="on",
                        ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, timeout_graceful_shutdown=2,
                        log_config=None)
    server = _server_class()(uv)
    # What start-up made (the app, its models) lives as long as the process: out of the collector's
    # sight. Events come by the thousand a second, each a few objects, so the youngest generation
    # is collected every GC_YOUNG allocations, not every 700 (memory stays bounded: the hot path
    # makes no cycles)
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    server.run(sockets=[sock])
    log.info("gateway_stopped")
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM/SIGINT ends it with status 0: stopping on request is no failure."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


if __name__ == "__main__":
    sys.exit(main())
