"""The daemon's HTTP surface: /metrics, /healthz, /readyz. Read-only; nothing here writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from reconciler.metrics import Metrics

# The loop is considered stuck when its heartbeat (every second) is older than this.
HEARTBEAT_STALE_SECONDS = 10.0


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


def build_application(metrics: Metrics, health: HealthState) -> web.Application:
    async def serve_metrics(request: web.Request) -> web.Response:
        del request
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        del request
        # Answering at all proves the loop runs; the heartbeat proves its tasks are not starved.
        age = time.time() - health.heartbeat()
        if age > HEARTBEAT_STALE_SECONDS:
            return web.json_response({"status": "stalled", "heartbeat_age_seconds": round(age, 1)}, status=503)
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


async def start_http(application: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(application, access_log=None, handle_signals=False)
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
