"""One frozen settings model, read from the environment (CONTRACTS.md section 3).

The environment is read here, in one place, because three of its features do not fit a flat model: the
Coder aliases of four settings, secrets that may come from files (`_FILE`, systemd credentials,
`/run/secrets`), and indexed sinks (`RECONCILER_WEBHOOK_<N>_URL`). `read_environment` turns all of that
into plain values; the pydantic-settings model validates them, with a bound on every number.

A bad value never reaches the user as a pydantic error: those carry the input, and the input may be a
secret. `ConfigError.problems` has one line per problem, naming the variable as the user spelled it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit

import yarl
from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reconciler.dsn import parse_dsn, redact_dsn
from reconciler.durations import format_duration, parse_duration

# EX_CONFIG from sysexits.h: systemd's RestartPreventExitStatus=78 keeps a misconfigured unit down.
EXIT_CONFIG = 78

PREFIX = "RECONCILER_"
CODER_PREFIX = "CODER_WORKSPACE_PREBUILDS_"

# Coder's names for the four reconciliation settings; the RECONCILER_ name wins when both are set.
CODER_ALIASES: Mapping[str, str] = {
    "reconciliation_interval": CODER_PREFIX + "RECONCILIATION_INTERVAL",
    "backoff_interval": CODER_PREFIX + "RECONCILIATION_BACKOFF_INTERVAL",
    "backoff_lookback": CODER_PREFIX + "RECONCILIATION_BACKOFF_LOOKBACK_PERIOD",
    "failure_hard_limit": CODER_PREFIX + "FAILURE_HARD_LIMIT",
}

# Where secrets may be read from when their variable is not set (after `<VARIABLE>_FILE`).
DEFAULT_SECRET_DIRECTORIES = ("/run/secrets",)

_WEBHOOK_VARIABLE = re.compile(r"^RECONCILER_WEBHOOK_(\d+)_(URL|SECRET|TIMEOUT)(_FILE)?$")


class ConfigError(Exception):
    """The configuration is invalid; `problems` has one line per problem and never a secret."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def _bounded(low: timedelta, high: timedelta) -> AfterValidator:
    def check(value: timedelta) -> timedelta:
        if not low <= value <= high:
            raise ValueError(f"must be between {format_duration(low)} and {format_duration(high)}")
        return value

    return AfterValidator(check)


def Duration(low: timedelta, high: timedelta) -> Any:  # noqa: N802 - reads as a type in annotations
    return Annotated[timedelta, BeforeValidator(_duration), _bounded(low, high)]


def _codes(value: Any) -> Any:
    if isinstance(value, str):
        return frozenset(code.strip() for code in value.split(",") if code.strip())
    return value


ErrorCodes = Annotated[frozenset[str], BeforeValidator(_codes)]

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# Time a dispatcher keeps for its database writes after its slowest sink gave up.
NOTIFICATION_LEASE_MARGIN = 10 * SECOND


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _split_url(text: str, expected: str) -> SplitResult:
    """urlsplit, whose own errors quote the URL (and so its password or token): replaced by ours."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0-65535
    except ValueError:
        raise ValueError(f"not a valid URL (expected {expected})") from None
    return parts


# What a resolver accepts in a host name once yarl has encoded it (IDNA): ASCII letters, digits, '-', '_'.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _http_url(value: SecretStr) -> SecretStr:
    """A URL that aiohttp can send to: checked here as aiohttp will read it (yarl), so that a URL it would
    fail on is refused at start-up, not at the first delivery, and with a message that never quotes it."""
    text = value.get_secret_value()
    parts = _split_url(text, "https://host/path")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    try:
        url = yarl.URL(text)
        host = url.raw_host or ""
        port = url.port
    except (ValueError, UnicodeError):
        raise ValueError("not a valid URL (expected https://host/path)") from None
    if not _is_ip_address(host):
        # asyncio's resolver encodes the name with the `idna` codec, which refuses empty or long labels.
        try:
            host.encode("idna")
        except UnicodeError:
            raise ValueError("the host name cannot be resolved as written (an empty or too long part?)") from None
        if not _HOST_NAME.fullmatch(host):
            raise ValueError("the host name has characters a host name cannot have")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("the port must be between 1 and 65535")
    return value


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _postgres_dsn(value: SecretStr) -> SecretStr:
    """A PostgreSQL URL that asyncpg reads as it was meant; every message is about its shape, never its text."""
    parse_dsn(value.get_secret_value())
    return value


class WebhookSink(BaseSettings):
    """One webhook: `RECONCILER_WEBHOOK_<N>_URL`, `_SECRET` (HMAC-SHA256 key) and `_TIMEOUT`."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    index: int
    # A URL may carry a token in its path or query: treated as a secret, never printed whole.
    url: Annotated[SecretStr, AfterValidator(_http_url)]
    secret: SecretStr | None = None
    timeout: Duration(SECOND, 5 * MINUTE) = timedelta(seconds=10)  # type: ignore[valid-type]

    @property
    def display_url(self) -> str:
        parts = urlsplit(self.url.get_secret_value())
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


class Settings(BaseSettings):
    """Every setting of the daemon; frozen, each number bounded."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    database_url: Annotated[SecretStr, AfterValidator(_postgres_dsn)] | None = None
    reconciliation_interval: Duration(SECOND, DAY) = MINUTE  # type: ignore[valid-type]
    backoff_interval: Duration(SECOND, DAY) = MINUTE  # type: ignore[valid-type]
    backoff_lookback: Duration(MINUTE, 30 * DAY) = HOUR  # type: ignore[valid-type]
    failure_hard_limit: int = Field(default=3, ge=0, le=1000)
    http_address: str = "127.0.0.1:2118"
    log_format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = "info"
    shutdown_grace: Duration(timedelta(0), HOUR) = 30 * SECOND  # type: ignore[valid-type]
    max_desired_instances: int = Field(default=100, ge=1, le=100_000)
    executor_concurrency: int = Field(default=8, ge=1, le=256)
    non_retryable_error_codes: ErrorCodes = frozenset({"REQUIRED_TEMPLATE_VARIABLES"})
    capacity_error_codes: ErrorCodes = frozenset({"INSUFFICIENT_QUOTA"})
    statement_timeout: Duration(SECOND, HOUR) = 30 * SECOND  # type: ignore[valid-type]
    connect_timeout: Duration(SECOND, 5 * MINUTE) = 10 * SECOND  # type: ignore[valid-type]
    pool_max_size: int = Field(default=10, ge=2, le=500)
    webhooks: tuple[WebhookSink, ...] = ()
    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_from: str | None = None
    smtp_security: Annotated[Literal["starttls", "tls", "none"], BeforeValidator(_lower)] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout: Duration(SECOND, 5 * MINUTE) = 30 * SECOND  # type: ignore[valid-type]
    notification_max_attempts: int = Field(default=8, ge=1, le=100)
    notification_poll_interval: Duration(timedelta(milliseconds=100), 10 * MINUTE) = 5 * SECOND  # type: ignore[valid-type]
    # A failed delivery is retried after base x 2^(attempt - 1), at most `retry_max`, less up to half as jitter.
    notification_retry_base: Duration(SECOND, HOUR) = 30 * SECOND  # type: ignore[valid-type]
    notification_retry_max: Duration(SECOND, DAY) = HOUR  # type: ignore[valid-type]
    # How long a dispatcher owns the messages it leased: a crashed one's messages come back after this.
    notification_lease: Duration(10 * SECOND, HOUR) = 2 * MINUTE  # type: ignore[valid-type]
    notification_batch_size: int = Field(default=20, ge=1, le=1000)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `read_environment` has already resolved aliases, files and indexed sinks into init values.
        return (init_settings,)

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        problems = []
        try:
            _split_address(self.http_address)
        except ValueError as error:
            problems.append(str(error))
        if self.smtp_host is not None and not self.smtp_from:
            problems.append("smtp_from: required when RECONCILER_SMTP_HOST is set")
        if self.smtp_password is not None and not self.smtp_username:
            problems.append("smtp_username: required when RECONCILER_SMTP_PASSWORD is set")
        if self.notification_retry_max < self.notification_retry_base:
            problems.append("notification_retry_max: must not be shorter than RECONCILER_NOTIFICATION_RETRY_BASE")
        if self.notification_lease < self.longest_sink_timeout + NOTIFICATION_LEASE_MARGIN:
            # A delivery still running when its lease runs out could be repeated by another replica.
            problems.append(
                f"notification_lease: must exceed the longest sink timeout by at least "
                f"{format_duration(NOTIFICATION_LEASE_MARGIN)} "
                f"(at least {format_duration(self.longest_sink_timeout + NOTIFICATION_LEASE_MARGIN)})"
            )
        # The pass holds one connection for its lock; the executor and the outbox need their own.
        if self.pool_max_size < self.executor_concurrency + 2:
            problems.append(
                f"pool_max_size: must be at least RECONCILER_EXECUTOR_CONCURRENCY + 2 "
                f"({self.executor_concurrency + 2}), or a pass could wait on itself for connections"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def http_host(self) -> str:
        return _split_address(self.http_address)[0]

    @property
    def http_port(self) -> int:
        return _split_address(self.http_address)[1]

    @property
    def longest_sink_timeout(self) -> timedelta:
        timeouts = [webhook.timeout for webhook in self.webhooks]
        if self.smtp_host is not None:
            timeouts.append(self.smtp_timeout)
        return max(timeouts, default=timedelta(0))

    @property
    def smtp_effective_port(self) -> int:
        if self.smtp_port is not None:
            return self.smtp_port
        return {"starttls": 587, "tls": 465, "none": 25}[self.smtp_security]


def _split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (every address). Raises ValueError with a reason."""
    host, separator, port_text = address.strip().rpartition(":")
    if not separator or not port_text.isdigit():
        raise ValueError("http_address: must be HOST:PORT, e.g. 127.0.0.1:2118 or [::1]:2118")
    port = int(port_text)
    if port > 65535:
        raise ValueError("http_address: the port must be between 0 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("http_address: write IPv6 addresses in brackets, e.g. [::1]:2118")
    return host or "0.0.0.0", port  # noqa: S104 - an empty host means every address, as in Go


# Settings whose values are secrets: never printed, and readable from files.
SECRET_FIELDS = frozenset({"database_url", "smtp_password"})


def variable_name(field: str) -> str:
    return PREFIX + field.upper()


def _secret_from_files(
    variable: str, file_name: str, environ: Mapping[str, str], problems: list[str]
) -> tuple[str, str] | None:
    """A secret's value from `<VARIABLE>_FILE` or a credential directory: (value, where it came from)."""
    path_text = environ.get(variable + "_FILE")
    if path_text:
        try:
            return Path(path_text).read_text(encoding="utf-8").rstrip("\r\n"), variable + "_FILE"
        except OSError as error:
            problems.append(f"{variable}_FILE: cannot read {path_text}: {error.strerror or error}")
        except UnicodeDecodeError:
            # The decoder's message would quote bytes of the secret.
            problems.append(f"{variable}_FILE: cannot read {path_text}: not UTF-8 text")
        return None
    directories = [environ["CREDENTIALS_DIRECTORY"]] if environ.get("CREDENTIALS_DIRECTORY") else []
    secret_directories = environ.get("RECONCILER_SECRETS_DIRECTORIES")
    directories += secret_directories.split(os.pathsep) if secret_directories else list(DEFAULT_SECRET_DIRECTORIES)
    for directory in directories:
        candidate = Path(directory) / file_name
        try:
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8").rstrip("\r\n"), str(candidate)
        except OSError:
            continue
        except UnicodeDecodeError:
            problems.append(f"{candidate}: cannot read: not UTF-8 text")
            return None
    return None


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Resolve the environment into (values, field -> variable it came from, problems found so far)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for field in Settings.model_fields:
        if field == "webhooks":
            continue
        variable = variable_name(field)
        for candidate in (variable, CODER_ALIASES.get(field)):
            if candidate is not None and candidate in environ:
                values[field], sources[field] = environ[candidate], candidate
                break
        else:
            if field in SECRET_FIELDS:
                found = _secret_from_files(variable, field, environ, problems)
                if found is not None:
                    values[field], sources[field] = found
    webhooks: dict[int, dict[str, Any]] = {}
    secret_files: dict[int, str] = {}
    for name in sorted(environ):
        match = _WEBHOOK_VARIABLE.match(name)
        if match is None:
            continue
        index, part, from_file = int(match.group(1)), match.group(2).lower(), match.group(3)
        if from_file and part != "secret":
            problems.append(f"{name}: only secrets can be read from files")
            continue
        # Sources are kept as spelled (`RECONCILER_WEBHOOK_01_URL`), so that messages name what was set.
        key = _webhook_source_key(index, part + ("_file" if from_file else ""))
        if key in sources:
            problems.append(f"{name}: the same setting as {sources[key]} (webhook {index}); set only one of them")
            continue
        sources[key] = name
        webhook = webhooks.setdefault(index, {"index": index})
        if from_file:
            secret_files[index] = name.removesuffix("_FILE")
        else:
            webhook[part] = environ[name]
    for index, webhook in webhooks.items():
        if "secret" not in webhook:
            variable = secret_files.get(index, f"{PREFIX}WEBHOOK_{index}_SECRET")
            found = _secret_from_files(variable, f"webhook_{index}_secret", environ, problems)
            if found is not None:
                webhook["secret"] = found[0]
                sources[_webhook_source_key(index, "secret")] = found[1]
    values["webhooks"] = [webhooks[index] for index in sorted(webhooks)]
    return values, sources, problems


def _webhook_source_key(index: int, part: str) -> str:
    return f"webhooks.{index}.{part}"


def _describe(error: Mapping[str, Any], sources: Mapping[str, str], values: Mapping[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if location and location[0] == "webhooks" and len(location) >= 2:
        webhook = values["webhooks"][int(location[1])]
        index = webhook["index"]
        part = location[2] if len(location) > 2 else "url"
        variable = sources.get(_webhook_source_key(index, part), f"{PREFIX}WEBHOOK_{index}_{part.upper()}")
        if error["type"] == "missing":
            return f"{variable}: required for this webhook"
        if part == "timeout" and isinstance(webhook.get(part), str):
            return f"{variable}: {message} (got {_shown(webhook[part])})"
        return f"{variable}: {message}"
    if not location:
        # A model-level check: its message already starts with the field it is about.
        lines = []
        for line in message.splitlines():
            field, _, reason = line.partition(": ")
            lines.append(f"{sources.get(field, variable_name(field))}: {reason}")
        return "\n".join(lines)
    field = location[0]
    variable = sources.get(field, variable_name(field))
    raw = values.get(field)
    if field in SECRET_FIELDS or raw is None or not isinstance(raw, str):
        return f"{variable}: {message}"
    return f"{variable}: {message} (got {_shown(raw)})"


def _shown(raw: str) -> str:
    """A value that is not a secret, quoted for a message and cut to a readable length."""
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def load_settings(environ: Mapping[str, str] | None = None, *, require_database: bool = True) -> Settings:
    """The settings of this process; raises ConfigError listing every problem (never a secret)."""
    environ = os.environ if environ is None else environ
    values, sources, problems = read_environment(environ)
    settings: Settings | None = None
    try:
        settings = Settings(**values)
    except ValidationError as error:
        for detail in error.errors(include_input=False, include_url=False):
            problems.extend(_describe(detail, sources, values).splitlines())
    file_failed = any(problem.startswith(f"{PREFIX}DATABASE_URL_FILE: ") for problem in problems)
    if settings is not None and require_database and settings.database_url is None and not file_failed:
        problems.append(
            f"{PREFIX}DATABASE_URL: required (a PostgreSQL DSN, e.g. postgresql://user@host:5432/dbname; "
            f"or {PREFIX}DATABASE_URL_FILE)"
        )
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    return settings


def database_url_for_display(settings: Settings) -> str:
    if settings.database_url is None:
        return "(no database configured)"
    return redact_dsn(settings.database_url.get_secret_value())


# Query parameters of a webhook URL whose values are credentials whatever they look like.
_CREDENTIAL_WORDS = ("token", "key", "secret", "sig", "auth", "pass", "code", "credential")


def _looks_like_token(text: str) -> bool:
    """A path segment or query value that is probably a credential: long, or mixing in digits.

    Words like `hooks` or `services` are not redacted (they would blank out every line saying "webhook").
    """
    return len(text) >= 16 or (len(text) >= 8 and any(character.isdigit() for character in text))


def _url_secrets(url: str) -> set[str]:
    """What a webhook URL may carry as a credential, as written and as aiohttp writes it (yarl)."""
    found: set[str] = set()
    spellings = {url}
    with contextlib.suppress(ValueError, UnicodeError):
        spellings.add(str(yarl.URL(url)))
    for text in spellings:
        parts = urlsplit(text)
        found.add(text)
        # Everything after the host: what `display_url` hides.
        after_host = text.partition(parts.netloc)[2]
        if after_host not in ("", "/"):
            found.add(after_host)
        if parts.password:
            found |= {parts.password, unquote(parts.password)}
        for segment in parts.path.split("/"):
            if _looks_like_token(unquote(segment)):
                found |= {segment, unquote(segment)}
        for name, value in parse_qsl(parts.query):
            if _looks_like_token(value) or any(word in name.lower() for word in _CREDENTIAL_WORDS):
                found.add(value)
        for pair in parts.query.split("&"):
            raw_value = pair.partition("=")[2]
            if raw_value and unquote_plus(raw_value) in found:
                found.add(raw_value)
    return found


def known_secrets(settings: Settings) -> frozenset[str]:
    """Every secret the settings hold, in the spellings a log line could show: what `logs` redacts."""
    found: set[str] = set()
    if settings.database_url is not None:
        found |= parse_dsn(settings.database_url.get_secret_value()).secrets
    if settings.smtp_password is not None:
        found.add(settings.smtp_password.get_secret_value())
    for webhook in settings.webhooks:
        found |= _url_secrets(webhook.url.get_secret_value())
        if webhook.secret is not None:
            found.add(webhook.secret.get_secret_value())
    return frozenset(secret for secret in found if secret)
