"""The code is ruff clean: lint rules and formatting (pyproject's ``[tool.ruff]``).

Run in the suite so that CI, which runs the README's ``pytest``, checks them on every
clean clone. Ruff comes with the ``test`` extra; the test fails (it does not skip) when
it is missing, since a lint check that can silently not run checks nothing.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    assert importlib.util.find_spec("ruff"), "ruff is not installed: pip install -e '.[test]'"
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
