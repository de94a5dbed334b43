"""structlog setup shared by the three __main__ modules (nothing else configures logging)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Route structlog to stderr as coloured console lines or one JSON object per line."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def add_logging_flags(parser) -> None:
    parser.add_argument("--log-format", choices=("console", "json"), default="console", help="log line format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
