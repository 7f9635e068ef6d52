"""E-mail sink: one mail per message (each message has one recipient), over SMTP.

smtplib is blocking, so each mail is sent from a worker thread (`asyncio.to_thread`): the event loop,
and with it the passes and the health endpoints, never waits on a mail server.

Outcomes: a recipient without an address (or no recipient, or one suspended since) is skipped for good,
not retried; a 5xx refusal of the recipient is permanent; everything else (connection, TLS, timeouts,
authentication, 4xx replies) is retried, because it is usually the server or our configuration, and an
operator can fix either before the attempts run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate

from reconciler.config import Settings
from reconciler.notify.message import DeliveryResult, OutgoingMessage


class EmailSender:
    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        if settings.smtp_host is None or not settings.smtp_from:
            raise ValueError("the e-mail sink needs RECONCILER_SMTP_HOST and RECONCILER_SMTP_FROM")
        self._host = settings.smtp_host
        self._port = settings.smtp_effective_port
        self._security = settings.smtp_security
        self._sender = settings.smtp_from
        self._username = settings.smtp_username
        self._password = settings.smtp_password
        self._timeout = settings.smtp_timeout.total_seconds()
        # Tests hand in a context that trusts their own certificate; production uses the system's.
        self._ssl_context = ssl_context

    @property
    def name(self) -> str:
        return "email"

    @property
    def kind(self) -> str:
        return "email"

    @property
    def description(self) -> str:
        return f"e-mail via {self._host}:{self._port} ({self._security})"

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        recipient = message.recipient
        if recipient is None:
            return DeliveryResult.skipped("no recipient (nobody to tell; webhooks only)")
        if not recipient.active:
            return DeliveryResult.skipped("recipient is suspended or deleted")
        if not recipient.email:
            return DeliveryResult.skipped("recipient has no e-mail address")
        mail = self.compose(message, recipient.email)
        try:
            await asyncio.to_thread(self._send, mail, recipient.email)
        except smtplib.SMTPRecipientsRefused as error:
            code = min((code for code, _ in error.recipients.values()), default=0)
            if code >= 500:
                return DeliveryResult.rejected(f"recipient refused: SMTP {code}")
            return DeliveryResult.retry(f"recipient refused: SMTP {code}")
        except smtplib.SMTPResponseException as error:
            # Authentication, sender or data refused: the reply code says which; its text may quote us.
            return DeliveryResult.retry(f"SMTP {error.smtp_code} ({type(error).__name__})")
        except smtplib.SMTPNotSupportedError:
            return DeliveryResult.retry(f"the server does not support {self._security.upper()} or AUTH as configured")
        except smtplib.SMTPException as error:
            return DeliveryResult.retry(f"SMTP: {type(error).__name__}")
        except ssl.SSLError as error:
            return DeliveryResult.retry(f"TLS: {error.reason or type(error).__name__}")
        except TimeoutError:
            return DeliveryResult.retry(f"no answer within {self._timeout:g}s")
        except OSError as error:
            return DeliveryResult.retry(f"cannot connect: {error.strerror or type(error).__name__}")
        return DeliveryResult.success()

    def compose(self, message: OutgoingMessage, address: str) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = address
        # A header cannot hold a line break; a preset name could.
        mail["Subject"] = " ".join(message.title.split())
        mail["Date"] = formatdate(usegmt=True)
        # Stable across attempts, so a mail client can fold a rare repeat into one.
        domain = self._sender.rstrip(">").rpartition("@")[2] or "reconciler.invalid"
        mail["Message-ID"] = f"<{message.id}@{domain}>"
        mail["Auto-Submitted"] = "auto-generated"
        mail["X-Reconciler-Message-Id"] = str(message.id)
        mail.set_content(message.body + "\n")
        return mail

    def _send(self, mail: EmailMessage, address: str) -> None:
        """Runs in a worker thread: connect, secure, log in, send, quit."""
        context = self._ssl_context or ssl.create_default_context()
        client: smtplib.SMTP
        if self._security == "tls":
            client = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout, context=context)
        else:
            client = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        try:
            if self._security == "starttls":
                client.starttls(context=context)
            if self._username:
                client.login(self._username, self._password.get_secret_value() if self._password else "")
            client.send_message(mail, to_addrs=[address])
        finally:
            # Once the mail is accepted, a failed QUIT must not turn into a retry (and a second mail).
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            client.close()

    async def close(self) -> None:
        """Nothing is kept open between mails."""
