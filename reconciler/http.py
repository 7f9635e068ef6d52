"""The daemon's HTTP surface: /metrics, /healthz, /readyz. Read-only; nothing here writes."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from prometheus_client import CONTENT_TYPE_LATEST

from reconciler.metrics import Metrics

logger = structlog.get_logger(__name__)

# The loop is considered stuck when its heartbeat (every second) is older than this.
HEARTBEAT_STALE_SECONDS = 10.0
# A client has this long to send a request's headers, from when it connects or from the end of the
# previous response on a kept-alive connection; an idle kept-alive connection is closed after the same
# time. Prometheus and health checks send a whole request at once; a client that trickles its headers
# (or sends nothing) would otherwise hold a connection for as long as it likes.
HEADER_TIMEOUT_SECONDS = 10.0
# On stop, requests in flight get this long to finish (they only read memory).
SHUTDOWN_SECONDS = 2.0


class HttpBindError(Exception):
    pass


@dataclass
class Readiness:
    ready: bool = False
    reason: str = "starting"


@dataclass
class HealthState:
    readiness: Readiness
    heartbeat: Callable[[], float]
    # Why the reconciliation loop is stuck, or None while it makes progress.
    stuck: Callable[[], str | None] = lambda: None


def build_application(metrics: Metrics, health: HealthState) -> web.Application:
    async def serve_metrics(request: web.Request) -> web.Response:
        headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
        if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
            # Megabytes at fleet L, ~20x smaller gzipped; the per-preset part is compressed once per pass.
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=metrics.render_gzip(), headers=headers)
        return web.Response(body=metrics.render(), headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        del request
        # Answering at all proves the loop runs; the heartbeat proves its tasks are not starved.
        age = time.time() - health.heartbeat()
        if age > HEARTBEAT_STALE_SECONDS:
            return web.json_response({"status": "stalled", "heartbeat_age_seconds": round(age, 1)}, status=503)
        # The loop runs, but the passes may not: one waiting past its deadline, or every one cut by it.
        stuck = health.stuck()
        if stuck is not None:
            return web.json_response({"status": "stuck", "reason": stuck}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        del request
        readiness = health.readiness
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": readiness.reason}, status=503)

    application = web.Application()
    application.router.add_get("/metrics", serve_metrics)
    application.router.add_get("/healthz", healthz)
    application.router.add_get("/readyz", readyz)
    return application


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (a `q=0` refuses it, RFC 9110 12.5.3)."""
    for item in accept_encoding.split(","):
        coding, _, parameters = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        quality = parameters.strip().lower()
        if quality.startswith("q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, except that a client's malformed request is one line without a traceback.

    aiohttp logs every request it cannot parse with `logger.exception` (an error and a traceback per
    request, a flood under a scan); the request is the client's fault, answered 400, and worth one
    warning at most. aiohttp itself logs a first request that is not HTTP at all at debug level (TLS or
    other protocols on the port): that stays at debug. Every other exception (a bug) keeps its traceback.
    """

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if not _bad_request(msg, args, exc_info, logger.warning):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        if not _bad_request(msg, args, exc_info, logger.debug):
            super().debug(msg, *args, exc_info=exc_info, **kwargs)


_BYTES_LITERAL = re.compile(r"""\bb['"]""")


def _bad_request(msg: object, args: tuple[object, ...], exc_info: Any, log: Callable[..., Any]) -> bool:
    """Log a client's malformed request as one line (`http.bad_request`); False when it is not one."""
    if not isinstance(exc_info, HttpProcessingError):
        return False
    # aiohttp's message is a few words, then the offending bytes (as a `b'...'` literal, on the same line
    # or the next ones): keep the words only.
    first_line = next((line.strip() for line in exc_info.message.splitlines() if line.strip()), "")
    detail = _BYTES_LITERAL.split(first_line, maxsplit=1)[0].rstrip(" :")
    remote = args[0] if args and isinstance(args[0], str) else None
    log("http.bad_request", status=exc_info.code, error=type(exc_info).__name__, detail=detail[:120], remote=remote)
    return True


async def start_http(
    application: web.Application, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT_SECONDS
) -> web.AppRunner:
    runner = web.AppRunner(
        application,
        access_log=None,
        handle_signals=False,
        # aiohttp closes a connection whose keep-alive timer runs out while it waits for a request, which
        # starts when a connection opens and again after every response: a header timeout.
        keepalive_timeout=header_timeout,
        logger=_ServerLog(server_logger, {}),
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise HttpBindError(
            f"cannot listen on {host}:{port} (RECONCILER_HTTP_ADDRESS): {error.strerror or error}"
        ) from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the HTTP server is not listening")
