"""Helpers of the notification tests: presets at the hard limit, and real receivers.

The receivers are an aiohttp web server and an aiosmtpd SMTP server on 127.0.0.1, both in the test's own
event loop on a port chosen by the kernel. The SMTP client (smtplib) runs in a worker thread, so the loop
is free to serve it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from prometheus_client import CollectorRegistry

from reconciler import db
from reconciler.config import Settings, load_settings
from reconciler.notify.metrics import NotificationMetrics
from reconciler.reconcile import PassOutcome, PassResult, run_pass
from tests.factories import Factory, Preset, minutes

HANG = "hang"
# The webhook path and query carry a token, as real ones do: it must never reach a log or a row.
WEBHOOK_PATH = "/hooks/T0KEN-in-path"
WEBHOOK_QUERY = "signature=t0ken-in-query"


def settings_for(database_url: str, **environment: str) -> Settings:
    return load_settings({"RECONCILER_DATABASE_URL": database_url, **environment})


async def open_pool(database_url: str, size: int = 10) -> asyncpg.Pool:
    return await db.create_pool(database_url, max_size=size)


async def fail_prebuilds(
    factory: Factory,
    preset: Preset,
    count: int,
    *,
    at: datetime | None = None,
    error: str = "terraform apply failed: quota of widgets exceeded",
    error_code: str | None = "PROVISIONER_ERROR",
) -> None:
    """`count` prebuilds of `preset` whose first build failed (at `at`, default 30 minutes ago)."""
    when = at or factory.now - minutes(30)
    for _ in range(count):
        workspace = await factory.workspace(preset, created_at=when)
        await factory.build(workspace, status="failed", created_at=when, error=error, error_code=error_code)


async def pass_at(pool: asyncpg.Pool, settings: Settings, now: datetime) -> PassResult:
    result = await run_pass(pool, settings, now)
    assert result.outcome is PassOutcome.SUCCESS, result.error
    return result


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    answered: int | str


class WebhookReceiver:
    """Answers each POST with the next entry of `script` (a status code, or HANG), then 200."""

    def __init__(self, script: Sequence[int | str] = (), *, delay: float = 0.0) -> None:
        self.script = list(script)
        self.delay = delay
        self.requests: list[ReceivedRequest] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}?{WEBHOOK_QUERY}"

    def accepted(self) -> list[ReceivedRequest]:
        return [request for request in self.requests if isinstance(request.answered, int) and request.answered < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        action = self.script.pop(0) if self.script else 200
        self.requests.append(ReceivedRequest(request.path, request.query_string, dict(request.headers), body, action))
        if action == HANG:
            await self._release.wait()
            return web.Response(status=200)
        if self.delay:
            await asyncio.sleep(self.delay)
        assert isinstance(action, int)
        return web.Response(status=action, text="ok" if action < 300 else "no")

    async def __aenter__(self) -> WebhookReceiver:
        application = web.Application()
        application.router.add_post(WEBHOOK_PATH, self._handle)
        self._runner = web.AppRunner(application)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    recipients: list[str]
    message: EmailMessage
    secured: bool


@dataclass
class SmtpReceiver:
    """An SMTP server; `refuse_recipient` answers every RCPT with that reply, `refuse` some addresses."""

    refuse_recipient: str | None = None
    refuse: dict[str, str] = field(default_factory=dict)
    starttls_context: ssl.SSLContext | None = None
    implicit_tls_context: ssl.SSLContext | None = None
    credentials: tuple[str, str] | None = None
    mails: list[ReceivedMail] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.refuse_recipient is not None:
            return self.refuse_recipient
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        secured = session.ssl is not None or self.implicit_tls_context is not None
        self.mails.append(ReceivedMail(str(envelope.mail_from), list(envelope.rcpt_tos), message, secured))
        return "250 Message accepted for delivery"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        self.logins.append(login)
        # handled=False: aiosmtpd answers (235, or 535 on a refusal) itself.
        return AuthResult(success=(login, password) == self.credentials, handled=False)

    async def __aenter__(self) -> SmtpReceiver:
        def protocol() -> SMTP:
            return SMTP(
                self,
                hostname="localhost",
                tls_context=self.starttls_context,
                require_starttls=self.starttls_context is not None,
                authenticator=self._authenticate if self.credentials else None,
                auth_required=self.credentials is not None,
                # One mechanism: smtplib would try the next after a refusal, and the test wants the refusal.
                auth_exclude_mechanism=["LOGIN"],
                # The plain-text login test runs without TLS, which real servers would refuse.
                auth_require_tls=False,
            )

        self._server = await asyncio.get_running_loop().create_server(
            protocol, "127.0.0.1", 0, ssl=self.implicit_tls_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 made by the openssl command (no Python crypto library is needed)."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return certificate, key


def server_context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    return context


def client_context(certificate: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate))


class MetricsProbe:
    """Notification metrics on a registry of their own, read back as exact values."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = NotificationMetrics(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def delivered(self, outcome: str, sink_kind: str = "webhook") -> float | None:
        return self.value("prebuilds_reconciler_notifications_delivered_total", sink_kind=sink_kind, outcome=outcome)

    def finished(self, status: str, kind: str = "hard_limited") -> float | None:
        return self.value("prebuilds_reconciler_notification_messages_finished_total", kind=kind, status=status)


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, seconds: float = 20.0) -> None:
    """Poll `condition` without blocking the loop (the receivers live in it)."""
    try:
        async with asyncio.timeout(seconds):
            # Polling is the point: the condition is about other processes and the database.
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s waiting for {what}") from None
