"""The commands in a fresh interpreter, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]



def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``rankscope ARGS`` in a new interpreter (``env``: variables set on top of this one's); a hang fails the test
    after 300 s rather than blocking the suite."""
    return subprocess.run([sys.executable, "-m", "rankscope.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}, timeout=300)


def run_beamlora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``beamlora ARGS`` in a new interpreter, as :func:`run_cli` runs rankscope."""
    return subprocess.run([sys.executable, "-m", "beamlora.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2 and exactly one ``Error:`` line on stderr, no traceback, holding each of ``expected``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]
