"""Where the settings come from: pydantic-settings' own sources where they fit, ours for what they cannot read.

Highest priority first (`config.settings_sources`):

1. `Environment`: the library's environment source, over the mapping given to `load_settings`. Each
   setting's aliases are its variables (`RECONCILER_<NAME>`, and Coder's name after it for four).
2. `SecretFileVariables` (ours): `RECONCILER_DATABASE_URL_FILE` and `RECONCILER_SMTP_PASSWORD_FILE`.
3. `SecretDirectories`: the library's secrets-directory source, over `$CREDENTIALS_DIRECTORY` then
   `RECONCILER_SECRETS_DIRECTORIES` (default `/run/secrets`), for files named after the setting
   (`database_url`, `smtp_password`).
4. `IndexedWebhooks` (ours): `RECONCILER_WEBHOOK_<N>_URL`, `_SECRET`, `_TIMEOUT`, `_SECRET_FILE` and
   `webhook_<N>_secret` files; the only source of the `webhooks` setting.

Every source records where each of its values came from (`origins`: the variable, or the file), and
what it could not read (`problems`), so that a message names what the user wrote. A source never puts
a value in a message: values may be secrets.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

PREFIX = "RECONCILER_"
# The key under which the webhooks are given to the model (never read from a variable of that name).
WEBHOOKS_KEY = PREFIX + "WEBHOOKS"
DEFAULT_SECRET_DIRECTORIES = ("/run/secrets",)
SECRET_DIRECTORIES_VARIABLE = PREFIX + "SECRETS_DIRECTORIES"
WEBHOOK_VARIABLE = re.compile(r"RECONCILER_WEBHOOK_(.+?)_(URL|SECRET|TIMEOUT)(_FILE)?")


class TrackedSource(PydanticBaseSettingsSource):
    """A source that says where each of its values came from, and what it could not read."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.origins: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.problems: list[str] = []

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: these sources read every value at once, in __call__.
        return None, field_name, False


class Environment(EnvSettingsSource):
    """The library's environment source over a given mapping (the tests never use os.environ), exact names."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=True)
        self.origins: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.problems: list[str] = []

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, case_sensitive=True)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        value, variable, is_complex = super().get_field_value(field, field_name)
        if value is not None:
            # The library then gives the value under the setting's first alias: keep which one was set.
            self._variables[field_name] = variable
        return value, variable, is_complex

    def __call__(self) -> dict[str, Any]:
        self._variables: dict[str, str] = {}
        values = super().__call__()
        # A variable named like the webhooks' key is not how webhooks are set: `IndexedWebhooks` says how.
        values.pop(WEBHOOKS_KEY, None)
        self.values = dict(values)
        for field_name, variable in self._variables.items():
            key = first_alias(self.settings_cls.model_fields[field_name], field_name)
            if key in values:
                self.origins[key] = variable
        return values


def first_alias(field: FieldInfo, field_name: str) -> str:
    """The key a source gives a setting's value under: its first alias (its own variable)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    return alias if isinstance(alias, str) else field_name


def read_secret_file(path: Path, label: str, problems: list[str]) -> str | None:
    """A secret file's text without surrounding whitespace (as the library reads secrets directories)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        problems.append(f"{label}: cannot read {path}: {error.strerror or error}")
    except UnicodeDecodeError:
        # The decoder's message would quote bytes of the secret.
        problems.append(f"{label}: cannot read {path}: not UTF-8 text")
    return None


class SecretFileVariables(TrackedSource):
    """`<VARIABLE>_FILE` names a file holding the secret of `<VARIABLE>`; the variable itself wins."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str], keys: Iterable[str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._keys = tuple(keys)

    def __call__(self) -> dict[str, Any]:
        for key in self._keys:
            path_text = self._environ.get(key + "_FILE")
            if key in self.current_state or not path_text:
                continue
            text = read_secret_file(Path(path_text), key + "_FILE", self.problems)
            if text is not None:
                self.values[key], self.origins[key] = text, key + "_FILE"
        return dict(self.values)


def secret_directories(environ: Mapping[str, str]) -> list[Path]:
    """Where secret files are looked for, first found wins: systemd's credentials, then ours or /run/secrets."""
    directories = [environ["CREDENTIALS_DIRECTORY"]] if environ.get("CREDENTIALS_DIRECTORY") else []
    configured = environ.get(SECRET_DIRECTORIES_VARIABLE)
    directories += configured.split(os.pathsep) if configured else list(DEFAULT_SECRET_DIRECTORIES)
    return [Path(directory) for directory in directories if directory]


class _SecretFiles(BaseSettings):
    """The base of the models whose fields name the files to read from the secrets directories."""

    model_config = SettingsConfigDict(case_sensitive=True)


def read_secret_directories(
    directories: Sequence[Path], names: Iterable[str], problems: list[str]
) -> dict[str, tuple[str, Path]]:
    """The files called `names` in the secrets directories, read by pydantic-settings' secrets source: for
    each name, its text and the file it came from (the first directory that has it)."""
    names = sorted(set(names))
    # The library warns about a directory that does not exist, and fails on one that is a file.
    directories = [directory for directory in directories if directory.is_dir()]
    if not names or not directories:
        return {}
    fields: dict[str, Any] = dict.fromkeys(names, (str | None, None))
    model = create_model("SecretFiles", __base__=_SecretFiles, **fields)
    # The library's last directory wins: ours are in priority order, first wins.
    source = SecretsSettingsSource(model, secrets_dir=list(reversed(directories)))
    with warnings.catch_warnings():
        # An entry that is not a regular file, or leads outside its directory, is skipped (with a warning
        # of the library's, which would go to stderr): as if it were not there.
        warnings.simplefilter("ignore")
        try:
            found = source()
        except SettingsError:
            # A file the library could not read (not UTF-8, unreadable): said by our reader, whose messages
            # name the file and never quote its bytes.
            before = len(problems)
            for name in names:
                path = _winning_file(directories, name)
                if path is not None:
                    read_secret_file(path, str(path), problems)
            if len(problems) == before:
                problems.append(f"{', '.join(map(str, directories))}: cannot read the secrets directories")
            return {}
    return {
        name: (text, path)
        for name, text in found.items()
        if isinstance(text, str) and (path := _winning_file(directories, name)) is not None
    }


def _winning_file(directories: Sequence[Path], name: str) -> Path | None:
    """The file the library read for `name`: in the first directory where it is a regular file inside it."""
    for directory in directories:
        candidate = directory / name
        try:
            if candidate.is_file() and directory.resolve() in candidate.resolve().parents:
                return candidate
        except (OSError, RuntimeError):
            continue
    return None


class SecretDirectories(TrackedSource):
    """Secrets as files named after the setting in the secrets directories, read by the library; only
    for a secret set neither by its variable nor by its `_FILE` variable (not even one that failed)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str], files: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._directories = secret_directories(environ)
        self._files = files  # key -> file name

    def __call__(self) -> dict[str, Any]:
        wanted = {
            name: key
            for key, name in self._files.items()
            if key not in self.current_state and not self._environ.get(key + "_FILE")
        }
        for name, (text, path) in read_secret_directories(self._directories, wanted, self.problems).items():
            self.values[wanted[name]], self.origins[wanted[name]] = text, str(path)
        return dict(self.values)


class IndexedWebhooks(TrackedSource):
    """`RECONCILER_WEBHOOK_<N>_URL`, `_SECRET` (or `_SECRET_FILE`, or a `webhook_<N>_secret` file) and
    `_TIMEOUT`: one webhook per number N, written with the digits 0-9 (`01` and `1` are one webhook)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._directories = secret_directories(environ)
        self.webhooks: list[dict[str, Any]] = []
        # (index, part) -> the variable or file it came from, spelled as the user did.
        self.parts: dict[tuple[int, str], str] = {}

    def __call__(self) -> dict[str, Any]:
        webhooks: dict[int, dict[str, Any]] = {}
        secret_files: dict[int, str] = {}
        for name in sorted(self._environ):
            match = WEBHOOK_VARIABLE.fullmatch(name)
            if match is None:
                continue
            number, part, from_file = match.group(1), match.group(2).lower(), bool(match.group(3))
            if not (number.isascii() and number.isdigit()):
                # `\d` and int() would take `٣` (an Arabic-Indic three) for webhook 3.
                self.problems.append(f"{name}: the webhook's number must be written with the digits 0-9")
                continue
            index = int(number)
            if from_file and part != "secret":
                self.problems.append(f"{name}: only secrets can be read from files")
                continue
            key = (index, part + ("_file" if from_file else ""))
            if key in self.parts:
                self.problems.append(
                    f"{name}: the same setting as {self.parts[key]} (webhook {index}); set only one of them"
                )
                continue
            self.parts[key] = name
            webhook = webhooks.setdefault(index, {"index": index})
            if from_file:
                secret_files[index] = name
            else:
                webhook[part] = self._environ[name]
        self._read_secret_files(webhooks, secret_files)
        self.webhooks = [webhooks[index] for index in sorted(webhooks)]
        return {WEBHOOKS_KEY: self.webhooks}

    def _read_secret_files(self, webhooks: dict[int, dict[str, Any]], secret_files: Mapping[int, str]) -> None:
        """A secret not set by its variable comes from its `_FILE`, else from the secrets directories."""
        from_directories = {}
        for index, webhook in webhooks.items():
            if "secret" in webhook:
                continue
            if index in secret_files:
                variable = secret_files[index]
                text = read_secret_file(Path(self._environ[variable]), variable, self.problems)
                if text is not None:
                    webhook["secret"], self.parts[(index, "secret")] = text, variable
            else:
                from_directories[f"webhook_{index}_secret"] = index
        found = read_secret_directories(self._directories, from_directories, self.problems)
        for name, (text, path) in found.items():
            index = from_directories[name]
            webhooks[index]["secret"], self.parts[(index, "secret")] = text, str(path)

    def variable(self, position: int, part: str) -> str:
        """The variable (or file) of a part of the webhook at `position` in the list given to the model."""
        index = int(self.webhooks[position]["index"])
        return self.parts.get((index, part), f"{PREFIX}WEBHOOK_{index}_{part.upper()}")

    def raw(self, position: int, part: str) -> Any:
        return self.webhooks[position].get(part)
