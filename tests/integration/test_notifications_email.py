"""E-mail delivery against a real aiosmtpd server on 127.0.0.1: recipients, subject, body, TLS, failures."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from reconciler.config import Settings
from reconciler.notify.dispatcher import Dispatcher
from reconciler.notify.email import EmailSender
from tests.factories import Factory, Preset
from tests.integration.notification_helpers import (
    MetricsProbe,
    SmtpReceiver,
    WebhookReceiver,
    client_context,
    fail_prebuilds,
    pass_at,
    self_signed_certificate,
    server_context,
    settings_for,
)

SENDER = "Prebuild reconciler <reconciler@example.test>"

# The login tests run SMTP AUTH without TLS on purpose (aiosmtpd warns about exactly that).
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def smtp_settings(database_url: str, port: int, security: str = "none", **environment: str) -> Settings:
    return settings_for(
        database_url,
        RECONCILER_SMTP_HOST="127.0.0.1",
        RECONCILER_SMTP_PORT=str(port),
        RECONCILER_SMTP_FROM=SENDER,
        RECONCILER_SMTP_SECURITY=security,
        RECONCILER_SMTP_TIMEOUT="5s",
        **environment,
    )


async def hard_limited(factory: Factory, pool: asyncpg.Pool, database_url: str) -> Preset:
    preset = await factory.preset(desired=1, name="gpu")
    await fail_prebuilds(factory, preset, 3, error="out of GPUs", error_code="NO_GPU")
    await pass_at(pool, settings_for(database_url), factory.now)
    return preset


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=1)


async def statuses(connection: asyncpg.Connection) -> list[tuple[str, int, str | None]]:
    rows = await connection.fetch(
        "select status, attempts, last_error from notification_messages order by created_at, id"
    )
    return [(row["status"], row["attempts"], row["last_error"]) for row in rows]


async def test_one_mail_per_administrator_with_subject_and_body(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    preset_owner = await factory.organization(name="acme")
    template = await factory.template(preset_owner, name="gpu-workstation")
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await factory.user(
        username="grace",
        email="grace@example.test",
        organization=preset_owner,
        organization_roles=["organization-template-admin"],
    )
    await factory.user(username="bystander", email="bystander@example.test")
    preset = await factory.preset(template=template, name="gpu")
    await fail_prebuilds(factory, preset, 3, error="out of GPUs", error_code="NO_GPU")
    await pass_at(pool, settings_for(database_url), factory.now)
    probe = MetricsProbe()

    async with SmtpReceiver() as receiver:
        dispatcher = Dispatcher(pool, smtp_settings(database_url, receiver.port), probe.metrics)
        assert await dispatcher.dispatch_once(soon()) == 2
        await dispatcher.close()

    by_recipient = {tuple(mail.recipients): mail for mail in receiver.mails}
    assert set(by_recipient) == {("ada@example.test",), ("grace@example.test",)}
    message_ids = {row["id"] for row in await factory.connection.fetch("select id from notification_messages")}
    for (address,), mail in by_recipient.items():
        assert mail.mail_from == "reconciler@example.test"
        assert mail.message["To"] == address
        assert mail.message["From"] == SENDER
        # Folded (longer than 78 characters); the stdlib parser keeps the fold's leading space.
        assert (
            mail.message["Subject"].strip()
            == 'Prebuilds of preset "gpu" (gpu-workstation) stopped: failure limit reached'
        )
        assert mail.message["Auto-Submitted"] == "auto-generated"
        body = mail.message.get_content()
        assert 'The last 3 prebuilds of preset "gpu" of template "gpu-workstation"' in body
        assert 'organization "acme"' in body
        assert "Last error: out of GPUs (NO_GPU)" in body
        assert f"reconciler presets reset {preset.id}" in body
        assert any(str(message_id) in mail.message["Message-ID"] for message_id in message_ids)
    assert await statuses(factory.connection) == [("sent", 1, None), ("sent", 1, None)]
    assert probe.delivered("success", "email") == 2


async def test_a_recipient_without_an_address_is_skipped_not_retried(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="no-mail", email="", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()

    async with SmtpReceiver() as receiver:
        dispatcher = Dispatcher(pool, smtp_settings(database_url, receiver.port), probe.metrics)
        assert await dispatcher.dispatch_once(soon()) == 1
        assert await dispatcher.dispatch_once(soon() + timedelta(days=1)) == 0
        await dispatcher.close()

    assert receiver.mails == []
    # E-mail was the only sink and it had nobody to write to: recorded, with the reason, never failed.
    assert await statuses(factory.connection) == [("recorded", 1, "email: recipient has no e-mail address")]
    assert probe.delivered("skipped", "email") == 1
    assert probe.delivered("failed", "email") == 0
    assert probe.finished("recorded") == 1


async def test_a_message_with_nobody_to_tell_goes_to_webhooks_only(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()

    async with SmtpReceiver() as mail_server, WebhookReceiver() as webhook:
        settings = smtp_settings(database_url, mail_server.port, RECONCILER_WEBHOOK_0_URL=webhook.url)
        dispatcher = Dispatcher(pool, settings, probe.metrics)
        assert await dispatcher.dispatch_once(soon()) == 1
        await dispatcher.close()

    assert mail_server.mails == []
    assert len(webhook.requests) == 1
    assert b'"recipients":[]' in webhook.requests[0].body
    assert await statuses(factory.connection) == [("sent", 1, "email: no recipient (nobody to tell; webhooks only)")]


async def test_a_permanent_refusal_fails_at_once_and_a_temporary_one_is_retried(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="gone", email="gone@example.test", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()
    start = soon()

    async with SmtpReceiver(refuse_recipient="451 4.3.0 mailbox busy, try later") as receiver:
        dispatcher = Dispatcher(pool, smtp_settings(database_url, receiver.port), probe.metrics, jitter=lambda: 0.0)
        await dispatcher.dispatch_once(start)
        assert await statuses(factory.connection) == [("pending", 1, "email: recipient refused: SMTP 451")]
        receiver.refuse_recipient = "550 5.1.1 no such user"
        await dispatcher.dispatch_once(start + timedelta(seconds=15))
        await dispatcher.close()

    assert await statuses(factory.connection) == [("failed", 2, "email: recipient refused: SMTP 550")]
    assert probe.delivered("retry", "email") == 1
    assert probe.delivered("failed", "email") == 1
    assert probe.finished("failed") == 1


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the test CA")


@needs_openssl
async def test_starttls_and_login(factory: Factory, pool: asyncpg.Pool, database_url: str, tmp_path: Path) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)
    certificate, key = self_signed_certificate(tmp_path)

    async with SmtpReceiver(
        starttls_context=server_context(certificate, key), credentials=("mailer", "smtp-pa55word")
    ) as receiver:
        settings = smtp_settings(
            database_url,
            receiver.port,
            "starttls",
            RECONCILER_SMTP_USERNAME="mailer",
            RECONCILER_SMTP_PASSWORD="smtp-pa55word",
        )
        sender = EmailSender(settings, ssl_context=client_context(certificate))
        dispatcher = Dispatcher(pool, settings, MetricsProbe().metrics, sinks=[sender])
        await dispatcher.dispatch_once(soon())
        await dispatcher.close()

    assert [mail.recipients for mail in receiver.mails] == [["ada@example.test"]]
    assert receiver.mails[0].secured
    assert receiver.logins == ["mailer"]
    assert await statuses(factory.connection) == [("sent", 1, None)]


@needs_openssl
async def test_implicit_tls(factory: Factory, pool: asyncpg.Pool, database_url: str, tmp_path: Path) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)
    certificate, key = self_signed_certificate(tmp_path)

    async with SmtpReceiver(implicit_tls_context=server_context(certificate, key)) as receiver:
        settings = smtp_settings(database_url, receiver.port, "tls")
        sender = EmailSender(settings, ssl_context=client_context(certificate))
        dispatcher = Dispatcher(pool, settings, MetricsProbe().metrics, sinks=[sender])
        await dispatcher.dispatch_once(soon())
        await dispatcher.close()

    assert [mail.recipients for mail in receiver.mails] == [["ada@example.test"]]
    assert await statuses(factory.connection) == [("sent", 1, None)]


@needs_openssl
async def test_an_untrusted_certificate_is_retried_not_sent(
    factory: Factory, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)
    certificate, key = self_signed_certificate(tmp_path)

    async with SmtpReceiver(implicit_tls_context=server_context(certificate, key)) as receiver:
        # The system's trust store does not know the test CA.
        dispatcher = Dispatcher(pool, smtp_settings(database_url, receiver.port, "tls"), MetricsProbe().metrics)
        await dispatcher.dispatch_once(soon())
        await dispatcher.close()

    assert receiver.mails == []
    [(status, attempts, last_error)] = await statuses(factory.connection)
    assert (status, attempts) == ("pending", 1)
    assert last_error is not None
    assert last_error.startswith("email: TLS: CERTIFICATE_VERIFY_FAILED")


async def test_a_wrong_password_is_retried(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await hard_limited(factory, pool, database_url)

    async with SmtpReceiver(credentials=("mailer", "right")) as receiver:
        settings = smtp_settings(
            database_url, receiver.port, RECONCILER_SMTP_USERNAME="mailer", RECONCILER_SMTP_PASSWORD="wrong-pa55"
        )
        dispatcher = Dispatcher(pool, settings, MetricsProbe().metrics)
        await dispatcher.dispatch_once(soon())
        await dispatcher.close()

    assert receiver.mails == []
    assert await statuses(factory.connection) == [("pending", 1, "email: SMTP 535 (SMTPAuthenticationError)")]
