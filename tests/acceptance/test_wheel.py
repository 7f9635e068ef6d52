"""The built wheel carries its SQL: installed in a fresh virtual environment, `reconciler migrate` works
from a directory outside the source tree.

The wheel goes in with `--no-deps`; its dependencies are the ones of the environment running the tests,
made visible through a `.pth` file, so that the test needs no network for them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from reconciler import db

SOURCE = Path(__file__).resolve().parents[2]


def run(command: list[str], *, cwd: Path, environment: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# How the README (Deployment, systemd) tells operators to build the wheel they install.
README_BUILD_COMMAND = "python3 -m pip wheel --no-deps --wheel-dir dist ."


def build_wheel(output: Path) -> Path:
    """Build the wheel the way the README says, into `output` instead of `dist`."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(output)]
    if importlib.util.find_spec("hatchling") is not None:
        # The backend is here already: no isolated environment to download it into.
        command.append("--no-build-isolation")
    run([*command, str(SOURCE)], cwd=output)
    wheels = list(output.glob("reconciler-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def clean_environment(**variables: str) -> dict[str, str]:
    dropped = ("RECONCILER_", "CODER_", "PYTHON", "VIRTUAL_ENV")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    return {**environment, "RECONCILER_SECRETS_DIRECTORIES": "/nonexistent/reconciler-test-secrets", **variables}


@pytest.mark.slow
async def test_the_installed_wheel_migrates_an_empty_database(tmp_path: Path, empty_database_url: str) -> None:
    wheel = build_wheel(tmp_path)

    # The SQL is package data, at reconciler/sql, and all of it.
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("reconciler/sql/")}
    expected = {f"reconciler/{path.relative_to(SOURCE).as_posix()}" for path in (SOURCE / "sql").rglob("*.sql")}
    assert expected
    assert shipped == expected

    environment_directory = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(environment_directory)], cwd=tmp_path)
    python = environment_directory / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp_path,
        environment=clean_environment(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    site_packages = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    )
    # After the wheel's own directory on sys.path, so that `reconciler` is the installed one.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run(
        [str(python), "-c", "import reconciler.db as d; print(d.__file__); print(d.sql_directory())"],
        cwd=outside,
        environment=clean_environment(),
    ).splitlines()
    assert Path(where[0]).is_relative_to(site_packages), where
    assert Path(where[1]) == site_packages / "reconciler" / "sql"

    output = run(
        [str(environment_directory / "bin" / "reconciler"), "migrate"],
        cwd=outside,
        environment=clean_environment(RECONCILER_DATABASE_URL=empty_database_url, RECONCILER_LOG_FORMAT="json"),
    )
    everything = [migration.version for migration in db.migrations()]
    assert output.strip() == f"applied migrations {everything}"

    connection = await db.connect(empty_database_url)
    try:
        assert await db.schema_is_current(connection) == (True, "")
        tables = {
            row["tablename"]
            for row in await connection.fetch("select tablename from pg_tables where schemaname = 'public'")
        }
        assert {"provisioner_jobs", "workspace_builds", "template_version_presets", "notification_messages"} <= tables
        assert await connection.fetchval("select username from users where is_system") == "prebuilds"
    finally:
        await connection.close()


def test_the_readme_says_how_to_build_the_wheel_it_installs() -> None:
    readme = (SOURCE / "README.md").read_text(encoding="utf-8")
    # The command `build_wheel` runs, and an install of what it writes: an operator can follow both.
    assert README_BUILD_COMMAND in readme
    assert "pip install ./dist/reconciler-*.whl" in readme
