"""The DSN is read once, as asyncpg reads it: checked against the driver's own parser.

`asyncpg.connect_utils._parse_connect_dsn_and_args` is what `asyncpg.connect` and `create_pool` run on
the URL before connecting; calling it here (no connection is made) shows what the driver would use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from asyncpg import connect_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.dsn import DsnError, Host, parse_dsn, redact_dsn

SECRET = "S3CRETPW"


@pytest.fixture(autouse=True)
def _no_libpq_environment() -> Iterator[None]:
    """The driver falls back on PGHOST, PGPORT... : none of the machine's may change what it reads."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("PG")}
    yield
    os.environ.update(saved)


def driver_reads(dsn: str) -> tuple[list[Any], str, str | None, str]:
    """(addresses, user, password, database) as asyncpg reads `dsn`; raises what the driver raises."""
    addresses, parameters = connect_utils._parse_connect_dsn_and_args(  # type: ignore[attr-defined]  # private, on purpose
        dsn=dsn,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile="/nonexistent/pgpass",
        database=None,
        ssl="disable",
        service=None,
        servicefile="/nonexistent/pg_service.conf",
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )
    return addresses, parameters.user, parameters.password, parameters.database


def addresses_of(hosts: tuple[Host, ...]) -> list[Any]:
    port = [host.port or 5432 for host in hosts]
    return [
        os.path.join(host.name, f".s.PGSQL.{port}") if host.name.startswith("/") else (host.name, port)
        for host, port in zip(hosts, port, strict=True)
    ]


def assert_reads_as_the_driver(dsn: str) -> None:
    ours = parse_dsn(dsn)
    addresses, user, password, database = driver_reads(dsn)
    if ours.hosts:
        assert addresses == addresses_of(ours.hosts)
    if ours.user is not None:
        assert user == ours.user
    assert password == ours.password
    if ours.database is not None:
        assert database == ours.database


# --- the shapes of the issue, and what the driver makes of them ------------------------------------------

MISREAD = [
    # An unencoded '@' in the password: the driver splits at the first one, so the rest of the password
    # becomes the host, or a port that int() quotes in its error.
    f"postgresql://u:p@ss{SECRET}:word{SECRET}@127.0.0.1:5432/d",
    f"postgresql://u:p@{SECRET}@127.0.0.1/d",
    # A port in the query that is not a number: int() raises with it.
    f"postgresql://u:{SECRET}@/d?host=127.0.0.1&port=x",
    # A '/', '?' or '#' in the password ends the host part early.
    f"postgresql://admin:{SECRET}/x@127.0.0.1/platform",
    f"postgresql://admin:{SECRET}?x@127.0.0.1/platform",
    f"postgresql://admin:{SECRET}#x@127.0.0.1/platform",
    # A ':' in the password read as a port separator once a '/' ends the host part.
    f"postgresql://admin:{SECRET}:1/platform",
    # The driver silently drops what follows the ']' of an IPv6 address, or a non-numeric port after it.
    "postgresql://u@[::1]:abc/d",
    "postgresql://u@[::1]junk/d",
    # An empty entry in the host list: the driver fails with an IndexError.
    "postgresql://u@h1,/d",
    # A query that is not name=value pairs: parse_qs quotes it.
    f"postgresql://u@h/d?{SECRET}",
    # Tabs and line breaks are dropped by urlparse: another password than the one written.
    f"postgresql://u:{SECRET}\t@h/d",
    # A password with '?' and '@' read as a host, a port and a query: an '@' in the query of a URL whose
    # host part has none is refused (percent-encoded, it is accepted).
    "postgresql://u:5432?x=y@h/d",
    # Two ports in the query for one host.
    "postgresql:///d?host=h&port=1,2",
]


@pytest.mark.parametrize("dsn", MISREAD)
def test_what_the_driver_would_misread_is_refused_without_quoting_it(dsn: str) -> None:
    with pytest.raises(DsnError) as raised:
        parse_dsn(dsn)
    assert SECRET not in str(raised.value)
    assert "postgresql://u" not in str(raised.value)
    assert redact_dsn(dsn) == "(an unparseable DSN)"


def test_the_issues_shapes_are_really_misread_by_the_driver() -> None:
    # What the daemon was given: the password, the host 127.0.0.1, the port 5432...
    with pytest.raises(ValueError, match=f"word{SECRET}"):
        driver_reads(MISREAD[0])
    addresses, _, password, _ = driver_reads(MISREAD[1])
    assert (addresses, password) == ([(f"{SECRET}@127.0.0.1", 5432)], "p")
    with pytest.raises(ValueError, match="invalid literal for int"):
        driver_reads(MISREAD[2])
    assert driver_reads("postgresql://u@[::1]:abc/d")[0] == [("::1", 5432)]
    with pytest.raises(IndexError):
        driver_reads("postgresql://u@h1,/d")


READ_AS_MEANT = [
    f"postgresql://u:{quote('p@ss/wo:rd?#', safe='')}@127.0.0.1:5433/d%2Fb",
    "postgres://u@db.example/platform",
    "postgresql://u@h1:5433,h2,[::1]:5434/d",
    "postgresql://u:pw@/d?host=127.0.0.1&port=6000",
    "postgresql:///d?host=/run/postgresql&port=5433&user=me&password=pw&sslmode=disable",
    "postgresql://u@%2Frun%2Fpostgresql/d",
    "postgresql://h/d?host=ignored&port=ignored",
    "postgresql://h/d?user=u%40example.com",
    "postgresql://u:@h/d",
    "postgresql://h",
]


@pytest.mark.parametrize("dsn", READ_AS_MEANT)
def test_what_is_accepted_is_read_exactly_as_the_driver_reads_it(dsn: str) -> None:
    assert_reads_as_the_driver(dsn)


def test_the_password_and_its_spellings_are_the_secrets() -> None:
    parsed = parse_dsn(f"postgresql://u:{quote('p@ss', safe='')}@h/d?password=qpw%2B&sslpassword=key")
    assert parsed.password == "p@ss"
    assert parsed.secrets == {"p%40ss", "p@ss", "qpw%2B", "qpw+", "key"}
    assert parsed.display == "postgresql://u:***@h/d"


# --- any URL ----------------------------------------------------------------------------------------------

parts = st.text(alphabet=st.sampled_from("aZ09@:/?#%,[]=&.+- \u00e9"), max_size=8)


@st.composite
def urls(draw: st.DrawFn) -> str:
    """A URL built from random parts (some encoded, some not), its password starting with SECRET."""
    password = SECRET + draw(parts)
    written = quote(password, safe="") if draw(st.booleans()) else password
    user = draw(st.sampled_from(["u", "", "u:x", "a@b"]))
    hosts = draw(st.sampled_from(["127.0.0.1", "h:5432", "[::1]:5433", "h1,h2:1", "", "h:", ":5432"]))
    query = draw(st.sampled_from(["", "?sslmode=disable", "?host=h&port=5", f"?password={SECRET}x", "?a"]))
    return f"postgresql://{user}:{written}@{hosts}/{draw(parts)}{query}"


@settings(max_examples=500, deadline=None)
@given(urls())
def test_an_accepted_url_is_read_as_the_driver_reads_it_and_its_display_has_no_secret(dsn: str) -> None:
    try:
        parsed = parse_dsn(dsn)
    except DsnError as error:
        refusal = str(error)
    else:
        refusal = ""
    if refusal:
        assert SECRET not in refusal
        return
    assert_reads_as_the_driver(dsn)
    assert SECRET not in parsed.display
    assert SECRET not in redact_dsn(dsn)
    if parsed.password is not None and SECRET in parsed.password:
        assert parsed.password in parsed.secrets
