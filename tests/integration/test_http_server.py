"""The HTTP surface under abuse, with raw sockets: malformed requests and clients that never finish."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from reconciler.http import HealthState, Readiness, bound_port, build_application, start_http
from reconciler.logs import configure_logging
from reconciler.metrics import Metrics

pytestmark = pytest.mark.usefixtures("restore_logging")


@asynccontextmanager
async def server(**options: Any) -> AsyncIterator[int]:
    health = HealthState(readiness=Readiness(ready=True, reason=""), heartbeat=time.time)
    runner: web.AppRunner = await start_http(
        build_application(Metrics(CollectorRegistry()), health), "127.0.0.1", 0, **options
    )
    try:
        yield bound_port(runner)
    finally:
        await runner.cleanup()


async def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


BAD_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
]


async def test_each_malformed_request_is_one_warning_line_without_a_traceback() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    async with server() as port:
        for payload in BAD_REQUESTS:
            answer = await exchange(port, payload)
            status_line = answer.split(b"\r\n")[0]
            assert status_line.startswith(b"HTTP/1."), answer[:80]
            assert b" 400 " in status_line, answer[:80]
        # Not HTTP at all (a TLS hello), on a fresh connection: answered 400, logged at most as a warning.
        assert b" 400 " in (await exchange(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40))
        # A good request still works after all that.
        assert b" 200 OK" in await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    lines = log_lines(stream)
    assert not [line for line in lines if line["level"] in ("error", "critical")], lines
    assert not [line for line in lines if "exception" in line or "exc_info" in line], lines
    warnings = [line for line in lines if line["event"] == "http.bad_request"]
    assert len(warnings) == len(BAD_REQUESTS)
    assert {line["level"] for line in warnings} == {"warning"}
    assert all(line["status"] == 400 for line in warnings), warnings
    assert all(line["remote"] == "127.0.0.1" for line in warnings), warnings
    # The reason in a few words, never the client's bytes.
    assert all("\n" not in line["detail"] and "aaaa" not in line["detail"] for line in warnings)
    assert len(lines) <= len(BAD_REQUESTS) + 1


TRICKLE_SECONDS = 10.0


async def test_a_client_that_never_finishes_its_headers_is_disconnected() -> None:
    header_timeout = 1.0
    connections = 50
    async with server(header_timeout=header_timeout) as port:

        async def slow_client() -> tuple[float, bytes]:
            """Trickle one header line every 0.2 s for 10 s; how long until the server hangs up."""
            # Timed from before the connection exists: the server's clock for it starts later than this.
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            received = b""
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for index in range(int(TRICKLE_SECONDS / 0.2)):
                    await writer.drain()
                    try:
                        chunk = await asyncio.wait_for(reader.read(1024), 0.2)
                    except TimeoutError:
                        writer.write(f"X-Slow-{index}: y\r\n".encode())
                        continue
                    received += chunk
                    if not chunk:
                        break
            except ConnectionError:
                pass
            finally:
                writer.close()
            return time.monotonic() - started, received

        results = await asyncio.gather(*(slow_client() for _ in range(connections)))
        # Still serving once they are gone.
        assert b" 200 OK" in await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    durations = sorted(duration for duration, _ in results)
    # Every one was cut off by the server (the clients would trickle on for 10 s), none answered, and
    # none before its time was up.
    assert all(received == b"" for _, received in results)
    assert durations[0] >= header_timeout
    assert durations[-1] < TRICKLE_SECONDS / 2


async def test_an_idle_kept_alive_connection_is_closed_after_the_header_timeout() -> None:
    async with server(header_timeout=1.0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Timed from before the request: the server's timer starts once it has answered, later.
            sent = time.monotonic()
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b" 200 OK" in head
            # The body, then nothing: the server closes the connection a header timeout later (not the
            # hour aiohttp keeps idle connections by default).
            rest = await asyncio.wait_for(reader.read(), 10)
            assert b"ok" in rest
            assert 1.0 <= time.monotonic() - sent < 5
        finally:
            writer.close()
