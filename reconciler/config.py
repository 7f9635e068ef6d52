"""One frozen settings model, read from the environment by pydantic-settings (CONTRACTS.md section 3).

Each setting is read from its variable, `RECONCILER_<NAME>` (its alias; Coder's name is a second alias of
four settings), by the library's environment source, and a secret from a file named after it in the
secrets directories by the library's secrets source. What the library cannot read has sources of its
own, in `config_sources`: the `_FILE` variables and the indexed webhooks. Every number is bounded.

A bad value never reaches the user as a pydantic error: those carry the input, and the input may be a
secret. `ConfigError.problems` has one line per problem, naming the variable (or the file) the value came
from, as the user spelled it.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit

import yarl
from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from reconciler.config_sources import (
    PREFIX,
    SECRET_DIRECTORIES_VARIABLE,
    WEBHOOK_VARIABLE,
    WEBHOOKS_KEY,
    Environment,
    IndexedWebhooks,
    SecretDirectories,
    SecretFileVariables,
)
from reconciler.dsn import parse_dsn, redact_dsn
from reconciler.durations import format_duration, parse_duration
from reconciler.logs import MINIMUM_SECRET_LENGTH

# EX_CONFIG from sysexits.h: systemd's RestartPreventExitStatus=78 keeps a misconfigured unit down.
EXIT_CONFIG = 78

CODER_PREFIX = "CODER_WORKSPACE_PREBUILDS_"

# Coder's names for the four reconciliation settings; the RECONCILER_ name wins when both are set.
CODER_ALIASES: Mapping[str, str] = {
    "reconciliation_interval": CODER_PREFIX + "RECONCILIATION_INTERVAL",
    "backoff_interval": CODER_PREFIX + "RECONCILIATION_BACKOFF_INTERVAL",
    "backoff_lookback": CODER_PREFIX + "RECONCILIATION_BACKOFF_LOOKBACK_PERIOD",
    "failure_hard_limit": CODER_PREFIX + "FAILURE_HARD_LIMIT",
}

# Settings whose values are secrets: never printed, and readable from files (`<VARIABLE>_FILE`, or a file
# named after the setting in a secrets directory).
SECRET_FIELDS = frozenset({"database_url", "smtp_password"})

# Variables of ours that are not settings: read by the test suite and the benchmark, not by the daemon.
TOOL_VARIABLES = frozenset(
    {
        "RECONCILER_TEST_DATABASE_URL",
        "RECONCILER_SOAK_SECONDS",
        "RECONCILER_SOAK_PRESETS",
        "RECONCILER_SOAK_SEED",
        "RECONCILER_CI_ISOLATED",
    }
)


class ConfigError(Exception):
    """The configuration is invalid; `problems` has one line per problem and never a secret."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def variable_name(field: str) -> str:
    return PREFIX + field.upper()


def _with_coder_name(field: str) -> AliasChoices:
    return AliasChoices(variable_name(field), CODER_ALIASES[field])


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


# A duration as people write it: `90s`, `1m30s`, `250ms` or plain seconds.
Duration = Annotated[timedelta, BeforeValidator(_duration)]


def between(low: timedelta, high: timedelta) -> AfterValidator:
    """The bounds of a duration setting, said in the message as they would be written."""

    def check(value: timedelta) -> timedelta:
        if not low <= value <= high:
            raise ValueError(f"must be between {format_duration(low)} and {format_duration(high)}")
        return value

    return AfterValidator(check)


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


def _not_empty(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty (unset it to send unsigned requests)")
    return value


# A host name as a resolver takes it: ASCII labels of letters, digits and '-' (not at either end).
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_host_name(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    # An all-numeric last label is an IPv4 address gone wrong (`999.1.1.1`), not a name.
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (every address). Raises ValueError with a reason."""
    host, separator, port_text = address.strip().rpartition(":")
    if not separator or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:2118 or [::1]:2118")
    port = int(port_text)
    if port > 65535:
        raise ValueError("the port must be between 0 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not (_is_ip_address(host) and ":" in host):
            raise ValueError("not an IPv6 address between the brackets")
    elif ":" in host:
        raise ValueError("write IPv6 addresses in brackets, e.g. [::1]:2118")
    elif host and not (_is_ip_address(host) or _is_host_name(host)):
        raise ValueError("the host must be an IP address or a host name, e.g. 127.0.0.1, [::1] or localhost")
    return host or "0.0.0.0", port  # noqa: S104 - an empty host means every address, as in Go


class WebhookSink(BaseModel):
    """One webhook: `RECONCILER_WEBHOOK_<N>_URL`, `_SECRET` (HMAC-SHA256 key) and `_TIMEOUT`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    # A URL may carry a token in its path or query: treated as a secret, never printed whole.
    url: Annotated[SecretStr, AfterValidator(_http_url)]
    secret: Annotated[SecretStr, AfterValidator(_not_empty)] | None = None
    timeout: Annotated[Duration, between(SECOND, 5 * MINUTE)] = 10 * SECOND

    @property
    def display_url(self) -> str:
        parts = urlsplit(self.url.get_secret_value())
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


class Settings(BaseSettings):
    """Every setting of the daemon; frozen, each number bounded."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        # A setting is read from its variable, spelled exactly: the alias is the variable's name.
        alias_generator=AliasGenerator(validation_alias=variable_name),
        case_sensitive=True,
        # A value is text as written; no setting is JSON.
        enable_decoding=False,
    )

    database_url: Annotated[SecretStr, AfterValidator(_postgres_dsn)] | None = None
    reconciliation_interval: Annotated[Duration, between(SECOND, DAY)] = Field(
        MINUTE, validation_alias=_with_coder_name("reconciliation_interval")
    )
    backoff_interval: Annotated[Duration, between(SECOND, DAY)] = Field(
        MINUTE, validation_alias=_with_coder_name("backoff_interval")
    )
    backoff_lookback: Annotated[Duration, between(MINUTE, 30 * DAY)] = Field(
        HOUR, validation_alias=_with_coder_name("backoff_lookback")
    )
    failure_hard_limit: int = Field(3, ge=0, le=1000, validation_alias=_with_coder_name("failure_hard_limit"))
    http_address: str = "127.0.0.1:2118"
    log_format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = "info"
    shutdown_grace: Annotated[Duration, between(timedelta(0), HOUR)] = 30 * SECOND
    max_desired_instances: int = Field(default=100, ge=1, le=100_000)
    # The in-flight budget (issue 15.1): prebuild build jobs (creates and deletes, pending or running,
    # whoever started them) that may exist at once, across the deployment and per template; 0 = unlimited.
    max_in_flight: int = Field(default=0, ge=0, le=1_000_000)
    max_in_flight_per_template: int = Field(default=0, ge=0, le=1_000_000)
    # Backoff after failed prebuilds (issue 15.3): Coder's linear formula by default, or exponential with
    # a cap (`backoff_max`) and deterministic jitter.
    backoff_strategy: Annotated[Literal["linear", "exponential"], BeforeValidator(_lower)] = "linear"
    backoff_max: Annotated[Duration, between(SECOND, 30 * DAY)] = HOUR
    # The global breaker for shared outages (issue 15.2); off by default (Coder has none).
    breaker_enabled: bool = False
    # Share of the prebuild builds completed in the window that failed, from which it opens.
    breaker_failure_threshold: float = Field(default=0.5, gt=0, le=1)
    breaker_min_builds: int = Field(default=10, ge=1, le=1_000_000)
    breaker_min_presets: int = Field(default=3, ge=1, le=1_000_000)
    breaker_window: Annotated[Duration, between(MINUTE, DAY)] = 10 * MINUTE
    breaker_open_duration: Annotated[Duration, between(SECOND, DAY)] = 5 * MINUTE
    breaker_open_duration_max: Annotated[Duration, between(SECOND, 7 * DAY)] = HOUR
    breaker_probes: int = Field(default=3, ge=1, le=1000)
    # The slow start (issue 15.6): while no prebuild create has succeeded within the breaker's window, at
    # most this many prebuild creates in flight, so that an outage nobody has seen yet fails a few builds
    # rather than a whole wave; 0 = off (Coder's: everything wanted is asked for at once).
    slow_start: int = Field(default=0, ge=0, le=1_000_000)
    # A lower computed target deletes prebuilds once it has held this long (docs/DEMAND.md); 0 = at once.
    target_stabilization_window: Annotated[Duration, between(timedelta(0), DAY)] = 5 * MINUTE
    # Claim events older than this are purged; last week's demand needs 7 days and an hour.
    prebuild_events_retention: Annotated[Duration, between(2 * HOUR, 365 * DAY)] = 8 * DAY
    # Rotation (issue 15.4): replacements before deletes for expired prebuilds (0 = Coder's: delete at
    # once), and each prebuild's time-to-live shortened by up to this fraction of it (0 = none).
    surge: int = Field(default=0, ge=0, le=1000)
    ttl_jitter: float = Field(default=0.0, ge=0, le=0.5)
    # Cleanup of failed prebuilds (issue 15.5): per preset, the newest KEEP and any younger than KEEP_FOR
    # stay (and always the evidence of a verdict); the rest are deleted, at most 10 per preset and pass.
    failed_prebuilds_keep: int = Field(default=3, ge=0, le=100_000)
    failed_prebuilds_keep_for: Annotated[Duration, between(timedelta(0), 365 * DAY)] = DAY
    executor_concurrency: int = Field(default=8, ge=1, le=256)
    non_retryable_error_codes: ErrorCodes = frozenset({"REQUIRED_TEMPLATE_VARIABLES"})
    capacity_error_codes: ErrorCodes = frozenset({"INSUFFICIENT_QUOTA"})
    statement_timeout: Annotated[Duration, between(SECOND, HOUR)] = 30 * SECOND
    connect_timeout: Annotated[Duration, between(SECOND, 5 * MINUTE)] = 10 * SECOND
    # A pass that has not finished after this is ended: cancelled, then its connections cut.
    pass_timeout: Annotated[Duration, between(2 * SECOND, DAY)] = 5 * MINUTE
    pool_max_size: int = Field(default=10, ge=2, le=500)
    webhooks: tuple[WebhookSink, ...] = ()
    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_from: str | None = None
    smtp_security: Annotated[Literal["starttls", "tls", "none"], BeforeValidator(_lower)] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout: Annotated[Duration, between(SECOND, 5 * MINUTE)] = 30 * SECOND
    notification_max_attempts: int = Field(default=8, ge=1, le=100)
    notification_poll_interval: Annotated[Duration, between(timedelta(milliseconds=100), 10 * MINUTE)] = 5 * SECOND
    # A failed delivery is retried after base x 2^(attempt - 1), at most `retry_max`, less up to half as jitter.
    notification_retry_base: Annotated[Duration, between(SECOND, HOUR)] = 30 * SECOND
    notification_retry_max: Annotated[Duration, between(SECOND, DAY)] = HOUR
    # How long a dispatcher owns the messages it leased: a crashed one's messages come back after this.
    notification_lease: Annotated[Duration, between(10 * SECOND, HOUR)] = 2 * MINUTE
    notification_batch_size: int = Field(default=20, ge=1, le=1000)
    # `migrate` behind another one waits this long for it; each migration may take `migration_timeout`.
    migration_lock_timeout: Annotated[Duration, between(timedelta(0), DAY)] = 10 * MINUTE
    migration_timeout: Annotated[Duration, between(SECOND, DAY)] = HOUR
    # Change events (BEHAVIOR.md, "Change events"): react to the platform's notifications with a targeted
    # pass, gathering what arrives within `event_coalesce` into one.
    events_enabled: bool = True
    event_coalesce: Annotated[Duration, between(timedelta(0), 10 * SECOND)] = timedelta(milliseconds=100)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `Settings()` reads the process's environment as `load_settings()` does (no .env file).
        return (init_settings, *settings_sources(os.environ))

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        # One line per problem, each starting with the variable it is about. The address is checked here
        # rather than on its field, so that its problem is reported with these (pydantic skips this check
        # when a field is invalid).
        problems = []
        try:
            split_address(self.http_address)
        except ValueError as error:
            problems.append(f"RECONCILER_HTTP_ADDRESS: {error}")
        if self.smtp_host is not None and not self.smtp_from:
            problems.append("RECONCILER_SMTP_FROM: required when RECONCILER_SMTP_HOST is set")
        if self.smtp_password is not None and not self.smtp_username:
            problems.append("RECONCILER_SMTP_USERNAME: required when RECONCILER_SMTP_PASSWORD is set")
        if self.notification_retry_max < self.notification_retry_base:
            problems.append(
                "RECONCILER_NOTIFICATION_RETRY_MAX: must not be shorter than RECONCILER_NOTIFICATION_RETRY_BASE"
            )
        if self.notification_lease < self.longest_sink_timeout + NOTIFICATION_LEASE_MARGIN:
            # A delivery still running when its lease runs out could be repeated by another replica.
            problems.append(
                f"RECONCILER_NOTIFICATION_LEASE: must exceed the longest sink timeout by at least "
                f"{format_duration(NOTIFICATION_LEASE_MARGIN)} "
                f"(at least {format_duration(self.longest_sink_timeout + NOTIFICATION_LEASE_MARGIN)})"
            )
        # A pass reads its snapshot, then writes: each may take a statement timeout, one after the other.
        if self.pass_timeout < 2 * self.statement_timeout:
            problems.append(
                f"RECONCILER_PASS_TIMEOUT: must be at least twice RECONCILER_STATEMENT_TIMEOUT "
                f"(at least {format_duration(2 * self.statement_timeout)}): a pass reads its snapshot and then "
                "writes, and each statement may take up to the statement timeout"
            )
        # The pass holds one connection for its lock; the executor and the outbox need their own.
        if self.pool_max_size < self.executor_concurrency + 2:
            problems.append(
                f"RECONCILER_POOL_MAX_SIZE: must be at least RECONCILER_EXECUTOR_CONCURRENCY + 2 "
                f"({self.executor_concurrency + 2}), or a pass could wait on itself for connections"
            )
        if self.breaker_open_duration_max < self.breaker_open_duration:
            problems.append(
                "RECONCILER_BREAKER_OPEN_DURATION_MAX: must not be shorter than RECONCILER_BREAKER_OPEN_DURATION"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def http_host(self) -> str:
        return split_address(self.http_address)[0]

    @property
    def http_port(self) -> int:
        return split_address(self.http_address)[1]

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


# The settings that decide what a pass does. Every pass records their values in the database
# (`reconciler_settings`), and `plan`, `status` and the other read-only commands use the recorded values
# rather than their caller's (`reconciler/recorded_settings.py`). A new setting that changes what a pass
# decides is added here, and nowhere else; one that does not goes into OPERATIONAL_SETTINGS (a unit test
# makes every setting be in exactly one of the two).
BEHAVIOUR_SETTINGS: tuple[str, ...] = (
    "reconciliation_interval",
    "backoff_interval",
    "backoff_lookback",
    "failure_hard_limit",
    "max_desired_instances",
    "target_stabilization_window",
    "non_retryable_error_codes",
    "capacity_error_codes",
    "max_in_flight",
    "max_in_flight_per_template",
    "backoff_strategy",
    "backoff_max",
    "breaker_enabled",
    "breaker_failure_threshold",
    "breaker_min_builds",
    "breaker_min_presets",
    "breaker_window",
    "breaker_open_duration",
    "breaker_open_duration_max",
    "breaker_probes",
    "slow_start",
    "surge",
    "ttl_jitter",
    "failed_prebuilds_keep",
    "failed_prebuilds_keep_for",
)

# How this process connects, logs, serves and delivers: the caller's own, never recorded.
OPERATIONAL_SETTINGS: frozenset[str] = frozenset(
    {
        "database_url",
        "http_address",
        "log_format",
        "log_level",
        "shutdown_grace",
        "executor_concurrency",
        "statement_timeout",
        "pass_timeout",
        "connect_timeout",
        "pool_max_size",
        "webhooks",
        "smtp_host",
        "smtp_port",
        "smtp_from",
        "smtp_security",
        "smtp_username",
        "smtp_password",
        "smtp_timeout",
        "notification_max_attempts",
        "notification_poll_interval",
        "notification_retry_base",
        "notification_retry_max",
        "notification_lease",
        "notification_batch_size",
        "migration_lock_timeout",
        "migration_timeout",
        # When a pass runs, not what it decides.
        "events_enabled",
        "event_coalesce",
        # The purge runs beside the passes; it changes no plan.
        "prebuild_events_retention",
    }
)


def setting_text(value: object) -> str:
    """A setting's value as it is written in its variable, so that reading the text gives it back."""
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, frozenset | set):
        return ",".join(sorted(str(item) for item in value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def behaviour_values(settings: Settings) -> dict[str, str]:
    """The behaviour settings as `RECONCILER_<NAME>` -> text, in the order of BEHAVIOUR_SETTINGS."""
    return {variable_name(field): setting_text(getattr(settings, field)) for field in BEHAVIOUR_SETTINGS}


def settings_sources(
    environ: Mapping[str, str],
) -> tuple[Environment, SecretFileVariables, SecretDirectories, IndexedWebhooks]:
    """The sources of the settings, highest priority first (see `config_sources`)."""
    secrets = {variable_name(field): field for field in sorted(SECRET_FIELDS)}
    return (
        Environment(Settings, environ),
        SecretFileVariables(Settings, environ, secrets),
        SecretDirectories(Settings, environ, secrets),
        IndexedWebhooks(Settings, environ),
    )


def _aliases() -> dict[str, str]:
    """Every variable a setting is read from -> the setting."""
    aliases = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        aliases.update({choice: field for choice in choices if isinstance(choice, str)})
    return aliases


def _shown(raw: str) -> str:
    """A value that is not a secret, quoted for a message and cut to a readable length."""
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _describe(
    error: Mapping[str, Any], sources: tuple[Environment, SecretFileVariables, SecretDirectories, IndexedWebhooks]
) -> list[str]:
    """One validation error as lines `VARIABLE: reason`, naming where the value came from, never a secret."""
    location = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not location:
        # The checks between settings already name their variables, one line each.
        return message.splitlines()
    webhooks = sources[-1]
    if location[0] == WEBHOOKS_KEY and len(location) >= 2:
        position, part = int(location[1]), location[2] if len(location) > 2 else "url"
        variable = webhooks.variable(position, part)
        if error["type"] == "missing":
            return [f"{variable}: required for this webhook"]
        raw = webhooks.raw(position, part)
        if part == "timeout" and isinstance(raw, str):
            return [f"{variable}: {message} (got {_shown(raw)})"]
        return [f"{variable}: {message}"]
    key = location[0]
    # The source with the highest priority that gave this key is the one whose value was validated.
    origin, raw = next(
        ((source.origins[key], source.values[key]) for source in sources if key in source.origins), (key, None)
    )
    if _aliases().get(key) in SECRET_FIELDS or not isinstance(raw, str):
        return [f"{origin}: {message}"]
    return [f"{origin}: {message} (got {_shown(raw)})"]


def load_settings(environ: Mapping[str, str] | None = None, *, require_database: bool = True) -> Settings:
    """The settings of this process; raises ConfigError listing every problem (never a secret)."""
    environ = os.environ if environ is None else environ
    sources = settings_sources(environ)
    settings: Settings | None = None
    errors: list[Any] = []
    try:
        settings = Settings(_build_sources=(sources, {}))
    except ValidationError as error:
        errors = error.errors(include_input=False, include_url=False)
    problems = [problem for source in sources for problem in source.problems]
    for detail in errors:
        problems.extend(_describe(detail, sources))
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


def known_variables() -> frozenset[str]:
    """Every RECONCILER_ variable the daemon reads (the webhooks' as templates: `RECONCILER_WEBHOOK_<N>_URL`)."""
    settings = {alias for alias in _aliases() if alias.startswith(PREFIX) and alias != WEBHOOKS_KEY}
    files = {variable_name(field) + "_FILE" for field in SECRET_FIELDS}
    webhooks = {f"{PREFIX}WEBHOOK_<N>_{part}" for part in ("URL", "SECRET", "TIMEOUT", "SECRET_FILE")}
    return frozenset(settings | files | webhooks | {SECRET_DIRECTORIES_VARIABLE})


def _closest(name: str, known: frozenset[str]) -> str | None:
    """The known variable `name` was probably meant to be, a webhook's with its number put back."""
    number = re.search(r"_([0-9]+)_", name)
    template = name.replace(number.group(0), "_<N>_", 1) if number else name
    matches = difflib.get_close_matches(template, sorted(known), n=1, cutoff=0.75)
    if not matches:
        return None
    return matches[0].replace("<N>", number.group(1)) if number else matches[0]


def configuration_warnings(environ: Mapping[str, str], settings: Settings) -> list[tuple[str, dict[str, str]]]:
    """What is wrong but does not stop the daemon, as (log event, fields); never a value."""
    found: list[tuple[str, dict[str, str]]] = []
    known = known_variables()
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or name in TOOL_VARIABLES or WEBHOOK_VARIABLE.fullmatch(name):
            continue
        closest = _closest(name, known)
        found.append(("config.unknown_variable", {"variable": name, "closest": closest or "(none)"}))
    short = []
    if settings.database_url is not None:
        short.append(("RECONCILER_DATABASE_URL", parse_dsn(settings.database_url.get_secret_value()).password))
    if settings.smtp_password is not None:
        short.append(("RECONCILER_SMTP_PASSWORD", settings.smtp_password.get_secret_value()))
    for webhook in settings.webhooks:
        if webhook.secret is not None:
            short.append((f"{PREFIX}WEBHOOK_{webhook.index}_SECRET", webhook.secret.get_secret_value()))
    for variable, secret in short:
        if secret and len(secret) < MINIMUM_SECRET_LENGTH:
            found.append(
                (
                    "config.secret_not_redacted",
                    {"variable": variable, "reason": f"shorter than {MINIMUM_SECRET_LENGTH} characters"},
                )
            )
    return found


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
