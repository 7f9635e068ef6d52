"""A migration edited after it was applied is refused, by `migrate` and by the readiness check."""

from __future__ import annotations

import pytest

from reconciler import db


async def test_an_edited_migration_is_refused(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        await db.migrate(connection)
        assert await db.schema_is_current(connection) == (True, "")
        await connection.execute("update reconciler_schema_migrations set checksum = 'edited' where version = 1")
        with pytest.raises(db.SchemaError, match=r"\[1\].*checksum mismatch"):
            await db.migrate(connection)
        current, reason = await db.schema_is_current(connection)
        assert not current
        assert "checksum mismatch" in reason
    finally:
        await connection.close()
