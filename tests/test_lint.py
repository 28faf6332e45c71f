"""The code is ruff clean (lint rules and formatting, pyproject's ``[tool.ruff]``) and the
package type-checks with mypy (``[tool.mypy]``).

Run in the suite so that CI, which runs the README's ``pytest``, checks them on every
clean clone. Ruff comes with the ``test`` extra; the test fails (it does not skip) when
it is missing, since a lint check that can silently not run checks nothing. Mypy comes
with the ``test`` extra too, but is skipped, saying so, where it is not installed (a
runtime-only environment); CI installs it.
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


@pytest.mark.slow  # a cold mypy run over the package: about a minute on two cores
def test_mypy():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (the test extra has it: pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],  # files and settings: pyproject's [tool.mypy]
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
