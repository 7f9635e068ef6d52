"""The dispatcher's polls use their indexes on an outbox full of history, not a scan of every message.

The outbox only grows (sent and failed messages stay, as a record), while the dispatcher polls every few
seconds on every replica: its statements must cost what is pending, not what was ever sent.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from reconciler import db
from tests.factories import Factory
from tests.integration.query_plans import explain

PRESETS = 500
EPISODES = 20


@pytest.fixture
async def large_outbox(factory: Factory) -> None:
    """PRESETS x EPISODES sent messages to one admin (10,000 rows of history) and three pending ones."""
    version = await factory.version()
    admin = await factory.user(site_roles=["template-admin"])
    connection = factory.connection
    await connection.execute(
        "insert into template_version_presets (template_version_id, name, desired_instances) "
        "select $1, 'preset-' || i, 1 from generate_series(1, $2::int) i",
        version.id,
        PRESETS,
    )
    await connection.execute(
        """
        insert into notification_messages
            (notification_template_id, user_id, payload, status, dedupe_key, kind, preset_id, episode,
             attempts, sent_at, created_at)
        select '414d9331-c1fc-4761-b40c-d1f4702279eb'::uuid, $1::uuid, '{}', 'sent',
               'hard_limited:' || p.id || ':' || e || ':' || $1::uuid::text, 'hard_limited', p.id, e, 1,
               now() - make_interval(days => e), now() - make_interval(days => e)
        from template_version_presets p, generate_series(1, $2::int) e
        where p.template_version_id = $3
        """,
        admin.id,
        EPISODES,
        version.id,
    )
    await connection.execute(
        """
        update notification_messages set status = 'pending', sent_at = null
        where id in (select id from notification_messages where episode = 1 limit 3)
        """
    )
    await connection.execute("analyze notification_messages")
    await connection.execute("analyze template_version_presets")


@pytest.mark.usefixtures("large_outbox")
async def test_leasing_reads_pending_messages_through_the_due_index(connection: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    nodes = await explain(connection, "lease_notifications", now, now, uuid.uuid4(), 20)
    scanned = {node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"}
    assert "notification_messages" not in scanned
    indexes = {node.get("Index Name") for node in nodes}
    assert "notification_messages_due_idx" in indexes


@pytest.mark.usefixtures("large_outbox")
async def test_the_backlog_gauge_reads_the_pending_messages_only(connection: asyncpg.Connection) -> None:
    nodes = await explain(connection, "notification_backlog")
    scanned = {node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"}
    assert "notification_messages" not in scanned
    assert await connection.fetchval(db.queries()["notification_backlog"]) == 3
