"""The daemon's least-privilege role (`sql/roles/reconciler_role.sql`) on a test's database.

The script is run by the database's owner, as an operator runs it; then a fresh login role that is a
member of `prebuilds_reconciler` and of nothing else stands for the daemon. Roles are cluster-wide, so
each login gets a unique name and is dropped afterwards; the group role stays (the script creates it
when missing and narrows it per database).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from reconciler import db

ROLE_SCRIPT = Path(db.sql_directory()) / "roles" / "reconciler_role.sql"
GROUP_ROLE = "prebuilds_reconciler"


def as_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def run_role_script(connection: asyncpg.Connection) -> None:
    """Run the script as the operator does (the connection is the schema's owner)."""
    await connection.execute(ROLE_SCRIPT.read_text(encoding="utf-8"))


@asynccontextmanager
async def login_role(database_url: str, *, member_of: str | None = GROUP_ROLE) -> AsyncIterator[str]:
    """A DSN for a new login role, a member of `member_of` only (None: of no group), after the script ran."""
    owner = await asyncpg.connect(database_url)
    user = f"reconciler_test_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)
    created = False
    try:
        await run_role_script(owner)
        statement = "create role %I login password %L" + (" in role %I" if member_of else "")
        arguments = [user, password] + ([member_of] if member_of else [])
        placeholders = ", ".join(f"${index}::text" for index in range(1, len(arguments) + 1))
        await owner.execute(await owner.fetchval(f"select format('{statement}', {placeholders})", *arguments))
        created = True
        yield as_user(database_url, user, password)
    finally:
        if created:
            # Privileges a test granted it directly would keep the cluster-wide role from being dropped.
            await owner.execute(await owner.fetchval("select format('drop owned by %I', $1::text)", user))
            await owner.execute(await owner.fetchval("select format('drop role %I', $1::text)", user))
        await owner.close()
