"""structlog set-up: JSON when not on a terminal, a console renderer on one; stdlib loggers go the same way.

asyncpg, APScheduler and aiohttp log through the standard library. They are routed through structlog's
`ProcessorFormatter`, so one process writes one format, with the same timestamps and levels.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

# Libraries that are chatty at INFO about things our own events already say.
_QUIET_LIBRARIES = {"apscheduler": logging.WARNING, "aiohttp.access": logging.WARNING}


def _renderers(log_format: str, stream: TextIO) -> list[Any]:
    use_console = log_format == "console" or (log_format == "auto" and stream.isatty())
    if use_console:
        # The console renderer prints exceptions itself, readably.
        return [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    # JSON: a traceback becomes structured data, one event stays one line.
    return [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]


def configure_logging(log_format: str = "auto", log_level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger; safe to call more than once."""
    stream = stream or sys.stderr
    level = logging.getLevelNamesMapping()[log_level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderers(log_format, stream),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_reconciler", False):
            root.removeHandler(existing)
    handler._reconciler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet_level in _QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(level, quiet_level))
