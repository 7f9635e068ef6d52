"""Database plumbing: where the SQL lives, the connection pool, and the migration runner."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

# What store functions accept: a plain connection or one borrowed from a pool.
Connection = asyncpg.Connection | PoolConnectionProxy

logger = structlog.get_logger(__name__)

# The errors through which a database that went away, refused, or stopped answering reaches us, and which
# every part of the daemon survives (the pass fails and the next one retries, a loop logs and goes on,
# readiness turns 503). Anything else is a bug and keeps its traceback.
SURVIVABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable
    asyncpg.PostgresError,  # the server's refusal: a terminated backend, a timeout, a read-only standby
    asyncpg.InterfaceError,  # a connection that closed or broke under us
    # The driver's state machine caught mid-way by a backend terminated at the wrong moment ("cannot
    # switch to state 15"); the connection is discarded like any broken one.
    asyncpg.InternalClientError,
    TimeoutError,  # a client-side deadline: the server did not answer in time
)


def describe_error(error: BaseException) -> str:
    """`Type: message`, the one-line form in which database errors are logged and reported."""
    return f"{type(error).__name__}: {error}"


# A statement's client-side deadline is its server-side timeout plus this: the server's timeout normally
# fires first and says why; the client's covers a server that stopped answering (a frozen network, a
# stopped server), where the server's own timeout never reaches us.
REPLY_MARGIN = timedelta(seconds=5)

# How long the database may leave a connection idle inside a transaction before it ends the session. No
# connection of ours is idle in a transaction for long: each write is one short transaction, and the pass
# lock is a session lock held outside any transaction (see `reconcile`).
IDLE_IN_TRANSACTION_TIMEOUT = timedelta(seconds=60)

# Advisory lock keys, fixed so that every replica and every `reconciler migrate` agree.
MIGRATIONS_LOCK_KEY = 7_236_001
RECONCILIATION_LOCK_KEY = 7_236_002
# Held by each budgeted create and delete while it re-counts the jobs in flight (issue 15.1).
IN_FLIGHT_BUDGET_LOCK_KEY = 7_236_003
# The class of the template locks (two-key advisory locks, a key space apart from the keys above): a
# targeted pass holds its templates' for its whole run, a full pass a preset's template's while it writes
# that preset, so that the two never act on one preset at once (docs/DECISIONS.md).
TEMPLATE_LOCK_CLASS = 7_236_004

_QUERY_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaError(Exception):
    """The database schema is not one this code can work with."""


def sql_directory() -> Path:
    """The `sql/` folder: inside the installed package (wheel), or beside it in a source checkout."""
    package_directory = Path(__file__).resolve().parent
    for candidate in (package_directory / "sql", package_directory.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise FileNotFoundError(f"no sql/ folder found beside {package_directory}")


# A line ending in `-- only in NAME` belongs to the statement's variant `verb_noun_NAME` alone; one ending in
# `-- not in NAME` to every form but that variant. `-- targeted` is short for `-- only in targeted`.
_VARIANT_MARKER = re.compile(r"--\s*(?:(only in|not in)\s+(\w+)|(targeted))\s*$")


def parse_queries(text: str, source: str) -> dict[str, str]:
    """Split a `.sql` file into its named statements (`-- name: verb_noun` starts each one).

    A statement whose lines carry variant markers is several statements from one text, so that forms
    that differ in a line or two are not copies: `verb_noun` without the `only in` lines, and for each
    variant named, `verb_noun_NAME` with its own `only in NAME` lines and without its `not in NAME` ones.
    A targeted pass's form (`-- targeted`) restricts the full pass's to some templates.
    """
    matches = list(_QUERY_NAME.finditer(text))
    if not matches:
        raise ValueError(f"{source}: no '-- name:' blocks")
    queries: dict[str, str] = {}
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        if not body:
            raise ValueError(f"{source}: query {match.group(1)} is empty")
        marked = [(line, _line_marker(line)) for line in body.splitlines()]
        variants = sorted({marker[1] for _, marker in marked if marker is not None})
        for variant in (None, *variants):
            name = match.group(1) if variant is None else f"{match.group(1)}_{variant}"
            queries[name] = "\n".join(line for line, marker in marked if _in_variant(marker, variant))
    return queries


def _line_marker(line: str) -> tuple[bool, str] | None:
    """(True, NAME) for `-- only in NAME` (and `-- targeted`), (False, NAME) for `-- not in NAME`."""
    found = _VARIANT_MARKER.search(line)
    if found is None:
        return None
    if found.group(3):
        return (True, "targeted")
    return (found.group(1) == "only in", found.group(2))


def _in_variant(marker: tuple[bool, str] | None, variant: str | None) -> bool:
    if marker is None:
        return True
    only, name = marker
    return (name == variant) if only else (name != variant)


@functools.cache
def queries_in(file_name: str) -> Mapping[str, str]:
    """The named statements of one file of `sql/queries/`, loaded once, when a module first needs it.

    Each data-access module loads its own file only: the daemon never reads the demo's `platform.sql`.
    """
    path = sql_directory() / "queries" / file_name
    return parse_queries(path.read_text(encoding="utf-8"), path.name)


def _query_files() -> list[str]:
    return sorted(path.name for path in (sql_directory() / "queries").glob("*.sql"))


def queries() -> Mapping[str, str]:
    """Every named statement of every file of `sql/queries/` (for checks: names are unique across files)."""
    loaded: dict[str, str] = {}
    for file_name in _query_files():
        for name, body in queries_in(file_name).items():
            if name in loaded:
                raise ValueError(f"{file_name}: query {name} is defined twice")
            loaded[name] = body
    return loaded


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    found: list[Migration] = []
    for path in sorted((sql_directory() / "migrations").glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name} is not named NNNN_description.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


_CREATE_VERSION_TABLE = """
create table if not exists reconciler_schema_migrations (
    version integer primary key,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now()
)
"""


async def applied_versions(connection: Connection) -> dict[int, str]:
    """Recorded migrations (version -> checksum); empty when the version table does not exist."""
    exists = await connection.fetchval("select to_regclass('reconciler_schema_migrations') is not null")
    if not exists:
        return {}
    rows = await connection.fetch("select version, checksum from reconciler_schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _check_recorded(recorded: Mapping[int, str], known: list[Migration]) -> None:
    """Refuse a database newer than the code, or one migrated with a migration that was edited since."""
    _check_not_newer(recorded, known)
    edited = [
        migration.version
        for migration in known
        if migration.version in recorded and recorded[migration.version] != migration.checksum
    ]
    if edited:
        raise SchemaError(
            f"migration(s) {edited} differ from what was applied to this database (checksum mismatch): "
            "a released migration must never change; add a new one instead"
        )


def _check_not_newer(recorded: Mapping[int, str], known: list[Migration]) -> None:
    newest_known = known[-1].version if known else 0
    unknown = sorted(version for version in recorded if version > newest_known)
    if unknown:
        raise SchemaError(
            f"the database has schema version {unknown[-1]}, newer than this reconciler knows "
            f"({newest_known}); upgrade the reconciler instead of downgrading the schema"
        )


class MigrationLockTimeoutError(Exception):
    """Another migration held the migration lock for longer than we were willing to wait."""


# Who holds the migration lock (a bigint advisory key: its high half is `classid`, its low half `objid`).
_MIGRATION_LOCK_HOLDER = """
select a.pid, coalesce(a.application_name, '') as application_name, a.backend_start
from pg_locks l left join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.granted and l.classid = 0 and l.objid = $1 and l.objsubid = 1
limit 1
"""


async def _describe_migration_lock_holder(connection: asyncpg.Connection) -> str:
    row = await connection.fetchrow(_MIGRATION_LOCK_HOLDER, MIGRATIONS_LOCK_KEY)
    if row is None or row["pid"] is None:
        return "its holder is not visible to this role"
    application = f", application {row['application_name']!r}" if row["application_name"] else ""
    since = f", connected since {row['backend_start']:%Y-%m-%d %H:%M:%S %Z}" if row["backend_start"] else ""
    return f"held by server process {row['pid']}{application}{since}"


def _milliseconds(duration: timedelta) -> str:
    return str(max(int(duration.total_seconds() * 1000), 1))


async def _take_migration_lock(
    connection: asyncpg.Connection, wait: timedelta, on_wait: Callable[[str], None] | None
) -> None:
    """Take the migration lock, waiting at most `wait` for another migration to finish.

    The wait is one statement on the server, bounded there by `lock_timeout` and here by a client deadline
    a little longer; the connection's statement timeout (meant for passes) is lifted for it.
    """
    if await connection.fetchval("select pg_try_advisory_lock($1)", MIGRATIONS_LOCK_KEY):
        return
    if on_wait is not None:
        on_wait(await _describe_migration_lock_holder(connection))
    if wait <= timedelta(0):
        raise MigrationLockTimeoutError("another migration is running")
    await connection.execute("select set_config('lock_timeout', $1, false)", _milliseconds(wait))
    await connection.execute("select set_config('statement_timeout', '0', false)")
    try:
        await connection.execute(
            "select pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY, timeout=(wait + REPLY_MARGIN).total_seconds()
        )
    except asyncpg.LockNotAvailableError:
        raise MigrationLockTimeoutError("another migration is still running") from None
    finally:
        # Back to the connection's own settings.
        await connection.execute("reset lock_timeout; reset statement_timeout")


async def migrate(
    connection: asyncpg.Connection,
    *,
    lock_wait: timedelta = timedelta(minutes=10),
    migration_timeout: timedelta = timedelta(hours=1),
    on_wait: Callable[[str], None] | None = None,
    up_to: int | None = None,
) -> list[int]:
    """Apply pending migrations in order (up to version `up_to`, default all), each in its own
    transaction; return the versions applied.

    Runs under a session advisory lock held on this one connection (not a pool), so that several
    processes migrating at once queue up and each migration is applied exactly once. Behind another
    migration it calls `on_wait` (with who holds the lock) and waits at most `lock_wait`
    (MigrationLockTimeoutError after that). Each migration may take up to `migration_timeout`, whatever
    the connection's statement and lock timeouts (those are meant for passes).
    """
    known = [migration for migration in migrations() if up_to is None or migration.version <= up_to]
    await _take_migration_lock(connection, lock_wait, on_wait)
    try:
        await connection.execute(_CREATE_VERSION_TABLE)
        recorded = await applied_versions(connection)
        _check_recorded(recorded, migrations())
        applied: list[int] = []
        client_deadline = (migration_timeout + REPLY_MARGIN).total_seconds()
        for migration in known:
            if migration.version in recorded:
                continue
            async with connection.transaction():
                await connection.execute(
                    "select set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true)",
                    _milliseconds(migration_timeout),
                )
                await connection.execute(migration.sql, timeout=client_deadline)
                await connection.execute(
                    "insert into reconciler_schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            logger.info("migration.applied", version=migration.version, name=migration.name)
            applied.append(migration.version)
        return applied
    finally:
        await connection.execute("select pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)


async def schema_is_current(connection: Connection) -> tuple[bool, str]:
    """Whether every known migration is applied (and none unknown): (ok, reason when not)."""
    known = migrations()
    recorded = await applied_versions(connection)
    try:
        _check_recorded(recorded, known)
    except SchemaError as error:
        return False, str(error)
    missing = [migration.version for migration in known if migration.version not in recorded]
    if missing:
        return False, f"migrations not applied: {missing} (run `reconciler migrate`)"
    return True, ""


async def _initialize_connection(connection: asyncpg.Connection) -> None:
    # JSON in and out as Python objects, so that no query formats JSON by hand.
    import json

    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def connection_options(
    statement_timeout: timedelta,
    application_name: str,
    *,
    idle_in_transaction_timeout: timedelta = IDLE_IN_TRANSACTION_TIMEOUT,
) -> dict[str, Any]:
    return {
        # The client-side deadline of every call that names none (queries, transactions, the pool's reset
        # of a released connection, and the cancel request asyncpg sends for a query cut short): the
        # server's statement timeout cannot reach us from a server that stopped answering.
        "command_timeout": (statement_timeout + REPLY_MARGIN).total_seconds(),
        "server_settings": {
            "application_name": application_name,
            "statement_timeout": _milliseconds(statement_timeout),
            # A pass must never hang on a lock held by another component.
            "lock_timeout": "10000",
            "idle_in_transaction_session_timeout": _milliseconds(idle_in_transaction_timeout),
            # The snapshot statement's cost estimate crosses jit_above_cost at a few thousand presets, and
            # compiling it takes longer (~0.7 s measured at 10,000 presets) than running it.
            "jit": "off",
            # The snapshot sorts its ~50,000 live prebuilds four times (windows and groups): at the
            # server's default of 4 MB each sort spills to disk. 64 MB keeps them in memory (the main
            # statement at fleet L went from 1.55x to 1.33x the floor, measured alternately in one run);
            # a pass runs one such statement at a time, so the daemon's peak stays a few sorts of it.
            "work_mem": "64MB",
        },
    }


async def connect(
    dsn: str,
    *,
    statement_timeout: timedelta = timedelta(seconds=30),
    connect_timeout: timedelta = timedelta(seconds=10),
    application_name: str = "reconciler",
    idle_in_transaction_timeout: timedelta = IDLE_IN_TRANSACTION_TIMEOUT,
) -> asyncpg.Connection:
    connection: asyncpg.Connection = await asyncpg.connect(
        dsn,
        timeout=connect_timeout.total_seconds(),
        **connection_options(
            statement_timeout, application_name, idle_in_transaction_timeout=idle_in_transaction_timeout
        ),
    )
    await _initialize_connection(connection)
    return connection


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    statement_timeout: timedelta = timedelta(seconds=30),
    connect_timeout: timedelta = timedelta(seconds=10),
    application_name: str = "reconciler",
    idle_in_transaction_timeout: timedelta = IDLE_IN_TRANSACTION_TIMEOUT,
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        timeout=connect_timeout.total_seconds(),
        # Recycle idle connections so a restarted server or a failover is picked up cleanly.
        max_inactive_connection_lifetime=300,
        init=_initialize_connection,
        **connection_options(
            statement_timeout, application_name, idle_in_transaction_timeout=idle_in_transaction_timeout
        ),
    )
    assert pool is not None
    return pool


class Acquirer(Protocol):
    """What lends connections: a pool, or the `Connections` of one pass."""

    def acquire(self) -> AbstractAsyncContextManager[Connection]: ...


class Connections:
    """The connections one pass borrows from the pool, so that they can all be cut at once.

    Waiting for a free connection has a deadline (`acquire_timeout`), and `terminate()` closes every
    connection still borrowed, without a word to the server: what ends a pass whose database stopped
    answering, where a polite end (a rollback, the pool's reset, asyncpg's cancel request) would wait on
    that database too. The server rolls back what a closed connection left open.
    """

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: timedelta) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout.total_seconds()
        self._borrowed: set[PoolConnectionProxy] = set()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        connection = await self._pool.acquire(timeout=self._acquire_timeout)
        self._borrowed.add(connection)
        try:
            yield connection
        finally:
            # Borrowed until released: the release (a reset on the server) can hang as well.
            try:
                await self._pool.release(connection)
            finally:
                self._borrowed.discard(connection)

    def terminate(self) -> int:
        """Close every connection still borrowed; returns how many."""
        cut = 0
        for connection in list(self._borrowed):
            # A connection released meanwhile is the pool's again: not ours to close.
            with contextlib.suppress(asyncpg.InterfaceError):
                connection.terminate()
                cut += 1
        return cut
