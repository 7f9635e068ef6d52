"""How the embedded server is created: a disposable one skips initdb's final sync, a durable one keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.demo import embedded_postgres
from reconciler.demo.embedded_postgres import EmbeddedPostgres


def initdb_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, durable: bool) -> tuple[str, ...]:
    calls: list[tuple[str, ...]] = []

    def record(self: EmbeddedPostgres, program: str, *arguments: str, timeout: float = 60) -> None:
        calls.append((program, *arguments))

    monkeypatch.setattr(EmbeddedPostgres, "_run", record)
    monkeypatch.setattr(embedded_postgres, "_running_as_root", lambda: False)
    EmbeddedPostgres(tmp_path / "data", durable=durable).initialize()
    (call,) = calls
    assert call[0] == "initdb"
    return call[1:]


def test_a_disposable_server_skips_initdbs_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seconds of fsync on a disk busy with a durable server's commits, for data that runs without fsync.
    assert "--no-sync" in initdb_arguments(tmp_path, monkeypatch, durable=False)


def test_a_durable_server_is_synced_once_initialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--no-sync" not in initdb_arguments(tmp_path, monkeypatch, durable=True)
