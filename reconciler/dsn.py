"""A PostgreSQL URL read once, the way asyncpg will read it: to check it, to show it, and to know its secrets.

asyncpg (`connect_utils._parse_connect_dsn_and_args`) splits the URL with `urllib.parse.urlparse`, then
the credentials from the hosts at the *first* '@', the user from the password at the first ':', the host
list at ',', and each host from its port at the first ':' (after the ']' of an IPv6 address); it decodes
the percent-escapes of every part, and takes `host`, `port`, `user`, `password` and the others from the
query string. It checks nothing on the way: with an unencoded '@' in the password the rest of the password
becomes a host name (and the driver connects to it); a port that is not a number makes `int()` raise
with the text, password included, in its message.

`parse_dsn` reads the same way and refuses every URL that the driver would read otherwise than its writer
meant, or would fail on. Its messages describe the shape, never the text: they may be shown to anyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus, urlparse

EXAMPLE = "postgresql://user:password@host:5432/dbname"
SCHEMES = ("postgresql", "postgres")
# Query parameters whose value is a secret (libpq's names, which asyncpg reads).
SECRET_PARAMETERS = ("password", "sslpassword")

_IPV6_HOST = re.compile(r"\[([^\]]+)\](?::(.*))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PORT = re.compile(r"[0-9]{1,5}")
_AFTER_AT = "after the '@'"


class DsnError(ValueError):
    """The URL cannot be used as it is; the message never quotes it."""


@dataclass(frozen=True)
class Host:
    """One entry of the host list: a name, an IP address or a Unix socket directory; no port: the default."""

    name: str
    port: int | None


@dataclass(frozen=True)
class Dsn:
    """What asyncpg reads from a URL that `parse_dsn` accepted."""

    user: str | None
    password: str | None
    hosts: tuple[Host, ...]
    database: str | None
    # The URL without its password and query: scheme://user:***@hosts/database.
    display: str
    # Every spelling of a secret that the URL carries (as written, and decoded).
    secrets: frozenset[str]


def _decoded(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise DsnError(f"the percent-escapes of the {what} are not UTF-8 text") from None


def _port(text: str, where: str) -> int:
    # asyncpg calls int(), which also takes '+1', ' 1', '1_0' and digits of other scripts: refused here.
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        # After the '@', the likeliest cause is a password whose ':', '/', '?' or '#' ended it early.
        hint = " (percent-encode a ':', '/', '?' or '#' in the user name or password)" if where == _AFTER_AT else ""
        raise DsnError(f"the port {where} must be a number between 1 and 65535{hint}")
    return int(text)


def _hosts(host_list: str, *, decode: bool, where: str) -> tuple[Host, ...]:
    """asyncpg's `_parse_hostlist`: `decode` for the host list of the authority, not for the query's."""
    hosts = []
    for spec in host_list.split(","):
        if not spec:
            raise DsnError(f"an entry of the host list {where} is empty")
        if spec.startswith("/"):
            hosts.append(Host(spec, None))
            continue
        if spec.startswith("["):
            match = _IPV6_HOST.fullmatch(spec)
            if match is None:
                raise DsnError(f"an IPv6 address {where} must be written [address] or [address]:port")
            name, port_text = match.group(1), match.group(2) or ""
        else:
            name, _, port_text = spec.partition(":")
        if decode:
            name, port_text = _decoded(name, "host name"), _decoded(port_text, "port")
        if not name:
            raise DsnError(f"a host name {where} is missing")
        hosts.append(Host(name, _port(port_text, where) if port_text else None))
    return tuple(hosts)


def _query(query: str) -> tuple[dict[str, str], set[str]]:
    """The query's parameters (the last value of each, as asyncpg keeps), and the secrets among them."""
    parameters: dict[str, str] = {}
    secrets: set[str] = set()
    for pair in query.split("&"):
        name_text, equals, value_text = pair.partition("=")
        if not equals:
            # What parse_qs(strict_parsing=True) refuses, with the pair (perhaps a password) in its message.
            raise DsnError("the query must be name=value pairs separated by '&'")
        if not value_text:
            continue  # parse_qs drops a parameter without a value
        try:
            name, value = unquote_plus(name_text, errors="strict"), unquote_plus(value_text, errors="strict")
        except UnicodeDecodeError:
            raise DsnError("the percent-escapes of the query are not UTF-8 text") from None
        parameters[name] = value
        if name in SECRET_PARAMETERS:
            secrets |= {value_text, value}
    return parameters, secrets


def parse_dsn(text: str) -> Dsn:
    """Read `text` as asyncpg will; raises DsnError, with a message about the shape only, when it would
    read something else than what was meant, or fail."""
    scheme, separator, _ = text.partition("://")
    if scheme not in SCHEMES or not separator:
        raise DsnError(f"must be a postgresql:// URL, e.g. {EXAMPLE}")
    if _CONTROL.search(text):
        # urlparse drops tabs and line breaks silently: the driver would read another password.
        raise DsnError("control characters (tab, line break...) must be percent-encoded")
    try:
        parts = urlparse(text)
    except ValueError:
        # Its messages quote the host part, which may hold the password.
        raise DsnError(f"not a valid URL (expected {EXAMPLE})") from None
    if "#" in text:
        raise DsnError("a '#' must be percent-encoded (%23): the driver ignores everything after it")
    at_signs = parts.netloc.count("@")
    if at_signs > 1:
        raise DsnError("an '@' in the user name or password must be percent-encoded (%40)")
    if "@" in parts.path or (not at_signs and "@" in parts.query):
        # A '/' or '?' in a password ends the host part early: the rest would be read as a database name.
        raise DsnError("a '/', '?', '#' or '@' in the user name or password must be percent-encoded (%2F, ...)")
    credentials, _, host_list = parts.netloc.rpartition("@")
    user_text, colon, password_text = credentials.partition(":")
    secrets = {password_text, _decoded(password_text, "password")} if password_text else set()
    hosts = _hosts(host_list, decode=True, where=_AFTER_AT) if host_list else ()
    parameters, query_secrets = _query(parts.query) if parts.query else ({}, set())
    secrets |= query_secrets
    if not hosts:
        # The query's hosts and ports count only when the URL names no host before its path.
        port_list = parameters.get("port")
        ports = [_port(port, "in the query") for port in port_list.split(",")] if port_list else []
        if parameters.get("host"):
            hosts = _hosts(parameters["host"], decode=False, where="in the query")
        if len(ports) > 1 and len(ports) != len(hosts):
            raise DsnError("the query's port list must have one port per host, or a single port")
        if ports:
            # Given in the query, the ports replace those of the host list (one port: for every host).
            ports = ports * len(hosts) if len(ports) == 1 else ports
            hosts = tuple(Host(host.name, port) for host, port in zip(hosts, ports, strict=True))
    database_text = parts.path.removeprefix("/")
    at = "@" if at_signs else ""
    display = f"{scheme}://{user_text}{':***' if colon and password_text else ''}{at}{host_list}{parts.path}"
    return Dsn(
        user=_decoded(user_text, "user name") if user_text else parameters.get("user"),
        password=_decoded(password_text, "password") if password_text else parameters.get("password"),
        hosts=hosts,
        database=(
            _decoded(database_text, "database name")
            if parts.path
            else parameters.get("dbname", parameters.get("database"))
        ),
        display=display,
        secrets=frozenset(secret for secret in secrets if secret),
    )


def redact_dsn(text: str) -> str:
    """The URL without its password, for messages; never fails, never returns a secret."""
    try:
        return parse_dsn(text).display
    except DsnError:
        return "(an unparseable DSN)"
