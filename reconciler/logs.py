"""structlog set-up: JSON when not on a terminal, a console renderer on one; stdlib loggers go the same way.

asyncpg, APScheduler and aiohttp log through the standard library. They are routed through structlog's
`ProcessorFormatter`, so one process writes one format, with the same timestamps and levels.

No log line carries a secret (README, "Security"):

- tracebacks are rendered without the frames' local variables (structlog's defaults print them, and a
  driver's frames hold the DSN and its password);
- every line, whatever logger it came from, goes through one `Redactor` that replaces each known secret
  (given by `configure_logging` or `set_secrets`) in every spelling it can take, in every value of the
  event (its message, its fields, its traceback) just before the line is rendered.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog

# Libraries that are chatty at INFO about things our own events already say.
_QUIET_LIBRARIES = {"apscheduler": logging.WARNING, "aiohttp.access": logging.WARNING}

REDACTED = "[redacted]"
# Shorter secrets are not searched for: they would match everywhere, and would be guessed before being
# read in a log. The configuration warns about them (`config.short_secret`).
MINIMUM_SECRET_LENGTH = 4


def spellings(secret: str) -> set[str]:
    """The ways `secret` can appear in a rendered line: as is, percent-encoded, and inside a repr() or a
    JSON string (a repr inside JSON too), so that an escaped quote or non-ASCII letter does not hide it."""
    found = set()
    for text in {secret, quote(secret, safe=""), quote_plus(secret, safe="")}:
        for form in {text, *_inside_reprs(text)}:
            found |= {form, json.dumps(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1]}
    return found


def _inside_reprs(text: str) -> set[str]:
    """`text` as it reads inside the repr() of a longer string, which may quote with ' or with "."""
    quoted = repr(text)
    body = quoted[1:-1]
    if quoted[0] == '"':
        # `text` has a ' and no ": in a longer string that has a " too, the ' is escaped.
        return {body, body.replace("'", "\\'")}
    if "'" in text and '"' not in text:
        # In a longer string without any ", repr() quotes with " and leaves the ' as it is.
        return {body, body.replace("\\'", "'")}
    return {body}


class Redactor:
    """Replaces every known secret in a text by `[redacted]`; the one redaction every log line goes through."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms = {form for secret in secrets for form in spellings(secret) if len(form) >= MINIMUM_SECRET_LENGTH}
        # Longest first: where one secret contains another, the whole of it goes.
        alternatives = sorted(forms, key=lambda form: (-len(form), form))
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)


_redactor = Redactor()


def set_secrets(secrets: Iterable[str]) -> None:
    """Redact these secrets (and only these) from every log line written from now on."""
    global _redactor  # logging is process-wide: one redactor serves every handler
    _redactor = Redactor(secrets)


def redact(text: str) -> str:
    return _redactor(text)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_redacted(key): _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Any other object is written as its repr() by both renderers: redacted here, in that form.
    return redact(repr(value))


def _redact_event(logger: Any, method_name: str, event_dict: Any) -> Any:
    """Every value of the event, the rendered traceback included, redacted just before it is rendered.

    Before, not after: a secret found in rendered JSON could start inside an escape sequence (`\\u00b0`
    then `000...`), and cutting there would break the line.
    """
    del logger, method_name
    return _redacted(event_dict)


def _renderers(log_format: str, stream: TextIO) -> list[Any]:
    use_console = log_format == "console" or (log_format == "auto" and stream.isatty())
    if use_console:
        # The traceback as plain text (the standard library's, which never shows frame locals; rich's,
        # the console renderer's default when installed, does), then redacted with the rest.
        return [
            structlog.processors.format_exc_info,
            _redact_event,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ]
    # JSON: a traceback becomes structured data, one event stays one line; frames without their locals.
    without_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    return [structlog.processors.ExceptionRenderer(without_locals), _redact_event, structlog.processors.JSONRenderer()]


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    """An exception nobody caught is written as a log line, so that it is redacted like the others."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("reconciler").critical("process.crashed", exc_info=(kind, error, traceback))


class _Handler(logging.StreamHandler[TextIO]):
    """Ours, so that configuring again replaces it (and the tests' fixture can take it away)."""

    _reconciler = True


def configure_logging(
    log_format: str = "auto", log_level: str = "info", stream: TextIO | None = None, secrets: Iterable[str] = ()
) -> None:
    """Configure structlog and the stdlib root logger; safe to call more than once."""
    stream = stream or sys.stderr
    set_secrets(secrets)
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
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_reconciler", False):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet_level in _QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(level, quiet_level))
    sys.excepthook = _log_uncaught
