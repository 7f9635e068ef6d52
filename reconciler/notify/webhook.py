"""Webhook sink: one JSON POST per notice, signed when a secret is set.

A notice (one preset's hard limit, validation failure or recovery, in one episode) is enqueued as one
message per recipient, which suits e-mail. A webhook is a channel: it gets the notice once, from the
message that carries it (`carries_notice`), with every recipient listed in `recipients`.

Headers: `Idempotency-Key` (stable per message and sink, so a receiver can drop a repeat after a lost
answer), `X-Reconciler-Signature: sha256=<hex HMAC-SHA256 of the body>` with the sink's secret, and
`X-Reconciler-Attempt`. A 2xx answer is a success; anything else, a timeout or a connection error is
retried. Redirects are not followed: a receiver that moved must be reconfigured, not guessed at.

The URL may carry a token in its path or query, so neither the URL nor an aiohttp error's text (which
embeds the URL) is ever logged or stored: reasons are built from status codes and error types only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

import aiohttp

from reconciler.config import WebhookSink
from reconciler.notify.message import DeliveryResult, OutgoingMessage

SIGNATURE_HEADER = "X-Reconciler-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "X-Reconciler-Attempt"
MESSAGE_ID_HEADER = "X-Reconciler-Message-Id"
USER_AGENT = "reconciler-notifications/1"


def signature(secret: str, body: bytes) -> str:
    """The value of the signature header: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def idempotency_key(message_id: uuid.UUID, sink_name: str) -> str:
    # Derived, not stored: the same message and sink give the same key on every attempt and replica.
    return str(uuid.uuid5(message_id, sink_name))


def encode_body(message: OutgoingMessage) -> bytes:
    return json.dumps(message.as_json(), sort_keys=True, separators=(",", ":")).encode()


class WebhookSender:
    def __init__(self, sink: WebhookSink) -> None:
        self._sink = sink
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"webhook:{self._sink.index}"

    @property
    def kind(self) -> str:
        return "webhook"

    @property
    def description(self) -> str:
        return f"webhook {self._sink.index} ({self._sink.display_url})"

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, and reused: one connection pool per sink.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        return self._session

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        if not message.carries_notice:
            # One call per notice, not one per administrator: a channel does not need N copies.
            return DeliveryResult.skipped("told once per notice, by another message of it")
        body = encode_body(message)
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: idempotency_key(message.id, self.name),
            MESSAGE_ID_HEADER: str(message.id),
            ATTEMPT_HEADER: str(message.attempt),
        }
        if self._sink.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._sink.secret.get_secret_value(), body)
        timeout_seconds = self._sink.timeout.total_seconds()
        try:
            async with self._client().post(
                self._sink.url.get_secret_value(),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_seconds),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return DeliveryResult.success()
                return DeliveryResult.retry(f"HTTP {response.status}")
        except TimeoutError:
            return DeliveryResult.retry(f"no answer within {timeout_seconds:g}s")
        except aiohttp.ClientConnectorError as error:
            # Its text names the host and port only, never the path; the OS reason is what helps.
            return DeliveryResult.retry(f"cannot connect: {error.os_error.strerror or type(error.os_error).__name__}")
        except aiohttp.ClientError as error:
            return DeliveryResult.retry(f"request failed: {type(error).__name__}")
        except OSError as error:
            return DeliveryResult.retry(f"request failed: {error.strerror or type(error).__name__}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
