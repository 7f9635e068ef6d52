"""No secret in a log line: tracebacks without frame locals, and one redaction for every logger.

Each test writes through the real logging set-up (`configure_logging`) into a buffer, as the daemon writes
to stderr, in both formats.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.logs import MINIMUM_SECRET_LENGTH, REDACTED, Redactor, configure_logging, spellings

SECRET = "S3cret-pa55word"
# The loggers that write in a running daemon: ours (structlog) and the libraries' (stdlib).
LIBRARY_LOGGERS = ["asyncpg.pool", "aiohttp.client", "aiohttp.server", "apscheduler.scheduler", "asyncio"]
FORMATS = ["json", "console"]


pytestmark = pytest.mark.usefixtures("restore_logging")


def configured(log_format: str, secrets: tuple[str, ...] = (SECRET,)) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(log_format, "debug", stream, secrets=secrets)
    return stream


def fail_holding(dsn: str) -> None:
    password = dsn.rpartition(":")[2]
    raise ConnectionError(f"cannot connect (a driver error that quotes nothing of {len(password)} characters)")


def raised() -> BaseException:
    try:
        fail_holding(f"postgresql://u:{SECRET}")
    except ConnectionError as error:
        return error
    raise AssertionError("unreachable")


@pytest.mark.parametrize("log_format", FORMATS)
def test_a_traceback_shows_no_frame_locals(log_format: str) -> None:
    # No redaction here: only the missing locals keep the password out.
    stream = configured(log_format, secrets=())
    error = raised()
    structlog.get_logger("reconciler.test").error("ours.failed", exc_info=error)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).warning("Failed to restore the pool connection floor; retrying", exc_info=error)
    written = stream.getvalue()
    # Every traceback was written (its message names the password's length, never the password).
    assert written.count(f"nothing of {len(SECRET)} characters") == 1 + len(LIBRARY_LOGGERS), written
    assert SECRET not in written
    assert "locals" not in written


@pytest.mark.parametrize("log_format", FORMATS)
@pytest.mark.parametrize("name", ["reconciler.test", *LIBRARY_LOGGERS])
def test_every_logger_goes_through_the_redaction(log_format: str, name: str) -> None:
    stream = configured(log_format)
    error = ValueError(f"invalid literal for int() with base 10: 'word{SECRET}@127.0.0.1:5432'")
    if name.startswith("reconciler"):
        logger = structlog.get_logger(name)
        logger.warning("event %s", SECRET, dsn=f"postgresql://u:{SECRET}@h/d", nested={"k": [SECRET]})
        logger.error("failed", exc_info=error)
    else:
        logging.getLogger(name).warning("connecting with %r", {"password": SECRET})
        logging.getLogger(name).error("failed", exc_info=error)
    written = stream.getvalue()
    assert written.count(REDACTED) >= 2, written
    for spelling in spellings(SECRET):
        assert spelling not in written


def test_an_uncaught_exception_is_a_redacted_log_line() -> None:
    stream = configured("json")
    try:
        raise RuntimeError(f"the password is {SECRET}")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "process.crashed"
    assert event["level"] == "critical"
    assert SECRET not in line
    assert REDACTED in line


def test_secrets_can_be_replaced_and_short_ones_are_not_sought() -> None:
    redactor = Redactor(["abc", "abcd", "longer-secret", "longer-secret-still"])
    assert redactor("abc abcd") == f"abc {REDACTED}"
    # Where a secret contains another, the whole of it goes.
    assert redactor("x longer-secret-still y") == f"x {REDACTED} y"
    assert Redactor([])("anything") == "anything"
    assert MINIMUM_SECRET_LENGTH == 4


@pytest.mark.parametrize(
    "secret", ['with"quote', "back\\slash", "caf\u00e9-\u2603", "tab\there", "per%cent/sl:ash", "new\nline"]
)
@pytest.mark.parametrize("log_format", FORMATS)
def test_escaped_spellings_are_redacted_too(secret: str, log_format: str) -> None:
    stream = configured(log_format, secrets=(secret,))
    logger = structlog.get_logger("reconciler.test")
    logger.warning("plain", value=secret, quoted=repr(secret), inside={"list": [secret]})
    logging.getLogger("asyncpg.pool").warning("params=%r", {"password": secret})
    written = stream.getvalue()
    for spelling in spellings(secret):
        assert spelling not in written, spelling
    if log_format == "json":
        for line in written.splitlines():
            json.loads(line)


# Any text a log line could carry around a secret, and secrets of any character. A secret inside
# "[redacted]" would be found in the marker itself, not in what was logged: left out.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
secrets = st.text(st.characters(exclude_categories=["Cs"]), min_size=MINIMUM_SECRET_LENGTH, max_size=24).filter(
    lambda secret: not {"[", "]"} & set(secret) and secret not in REDACTED
)
# The console renderer adds spaces, '=', quotes, brackets and ':' of its own around values: a secret made
# of those could be found in the layout rather than in a value.
console_secrets = secrets.filter(lambda secret: not set(secret) & set(" \t\n=[]'\"{}:,().-_0123456789"))


def strings_in(value: Any) -> Iterator[str]:
    """Every key and string value of a decoded JSON line."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), texts, texts, st.sampled_from(["reconciler.pass", *LIBRARY_LOGGERS]), st.sampled_from(FORMATS))
def test_no_planted_secret_survives_any_logger(
    data: st.DataObject, before: str, after: str, name: str, log_format: str
) -> None:
    planted = data.draw(st.lists(secrets if log_format == "json" else console_secrets, min_size=1, max_size=3))
    stream = configured(log_format, secrets=tuple(planted))
    message = before + "".join(planted) + after
    error = RuntimeError(message)
    if name.startswith("reconciler"):
        structlog.get_logger(name).error(message, field=planted, repr_field=repr(message), exc_info=error)
    else:
        logging.getLogger(name).error("%s %r", message, planted, exc_info=error)
    written = stream.getvalue()
    assert written
    if log_format == "json":
        # What each line says, decoded: each is still one JSON object (the redaction never cuts a line).
        shown = [text for line in written.splitlines() for text in strings_in(json.loads(line))]
    else:
        shown = [written]
    for secret in planted:
        for spelling in spellings(secret):
            assert not any(spelling in text for text in shown), spelling
