"""Logging for every gridq module: structlog where a program configured it, else stdlib logging.

Library modules (the client above all: it runs inside the user's program) take
their logger from ``get_logger(__name__)`` and never print on their own. Where
structlog is configured (our ``__main__`` modules call ``configure_logging``)
their events go through it; elsewhere they go to the stdlib logger of the same
name, under the package loggers ``broker``, ``worker`` and ``client``, which
hold a NullHandler: silent unless the application configured ``logging``.
"""

from __future__ import annotations

import logging
import sys

import structlog

#: the package loggers that keep gridq quiet in a program that did not configure logging
for _package in ("broker", "worker", "client"):
    logging.getLogger(_package).addHandler(logging.NullHandler())

_min_level = logging.DEBUG  #: the level configure_logging set (cheap filter before structlog)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "exception": logging.ERROR}


class Logger:
    """structlog's logger interface (``info(event, **fields)``, ``bind``), routed at call time."""

    __slots__ = ("name", "context", "_std")

    def __init__(self, name: str, context: dict | None = None) -> None:
        self.name = name
        self.context = context or {}
        self._std = logging.getLogger(name)

    def bind(self, **fields) -> "Logger":
        return Logger(self.name, {**self.context, **fields})

    def debug(self, event: str, **fields) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields) -> None:
        self._log("error", event, fields)

    def exception(self, event: str, **fields) -> None:
        self._log("exception", event, fields)

    def _log(self, method: str, event: str, fields: dict) -> None:
        level = _LEVELS[method]
        if structlog.is_configured():
            if level >= _min_level:
                getattr(structlog.get_logger(self.name), method)(event, **self.context, **fields)
        elif self._std.isEnabledFor(level):
            text = " ".join(f"{k}={v!r}" for k, v in {**self.context, **fields}.items())
            self._std.log(level, "%s %s", event, text, exc_info=method == "exception")


def get_logger(name: str) -> Logger:
    """The logger a gridq library module uses: ``log = get_logger(__name__)``."""
    return Logger(name)


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Route structlog to stderr as coloured console lines or one JSON object per line."""
    global _min_level
    _min_level = getattr(logging, level.upper())
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_min_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def add_logging_flags(parser) -> None:
    parser.add_argument("--log-format", choices=("console", "json"), default="console", help="log line format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
