"""The real-PostgreSQL test harness.

The server is the one named by RECONCILER_TEST_DATABASE_URL when set (a DSN whose user may create
databases), otherwise an embedded PostgreSQL started for the session. A template database is migrated
once per session; every test that asks for `database_url` gets its own database cloned from it, so tests
commit, lock and run in parallel processes without seeing each other.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog

from reconciler import db
from reconciler.demo.embedded_postgres import EmbeddedPostgres
from tests.factories import Factory

TEST_DATABASE_ENV = "RECONCILER_TEST_DATABASE_URL"


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[EmbeddedPostgres | None]:
    """The embedded server, when the session uses one (None when a server is named)."""
    if os.environ.get(TEST_DATABASE_ENV):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="reconciler-test-pg-") as directory:
        server = EmbeddedPostgres(Path(directory) / "data")
        server.start()
        try:
            yield server
        finally:
            server.stop(mode="immediate")


@pytest.fixture(scope="session")
def server_dsn(embedded_server: EmbeddedPostgres | None) -> str:
    """An administrative DSN (database `postgres`) on the test server."""
    named = os.environ.get(TEST_DATABASE_ENV)
    if named:
        return with_database(named, "postgres")
    assert embedded_server is not None
    return embedded_server.dsn()


@pytest.fixture(scope="session")
async def template_database(server_dsn: str) -> AsyncIterator[str]:
    """A migrated database to clone; unique per session so that parallel sessions share a server."""
    name = f"reconciler_template_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'create database "{name}"')
        connection = await db.connect(with_database(server_dsn, name))
        try:
            await db.migrate(connection)
        finally:
            await connection.close()
        yield name
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"reconciler_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'create database "{name}" template "{template_database}"')
        yield with_database(server_dsn, name)
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"reconciler_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'create database "{name}"')
        yield with_database(server_dsn, name)
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database, as the daemon opens one (room for a pass's writers)."""
    pool = await db.create_pool(database_url, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that configure logging (or run the CLI in-process, which does): put the session's back."""
    saved = structlog.get_config()
    excepthook = sys.excepthook
    yield
    structlog.configure(**saved)
    sys.excepthook = excepthook
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_reconciler", False):
            root.removeHandler(handler)


@pytest.fixture
def factory(connection: asyncpg.Connection) -> Factory:
    return Factory(connection)
