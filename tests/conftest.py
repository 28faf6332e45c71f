"""Shared test set-up: float64, fixed seeds, the model zoo on the path, ../shared/data.

Test tiers. Tests that take more than a few seconds (fits against external references,
long federated fits, Flower processes, notebooks, the benchmarks' smoke runs, CLI
subprocesses) are marked ``@pytest.mark.slow`` (the marker is registered in
pyproject.toml). During development run the fast tier, identities, validation and units
(under 2 minutes on 2 busy cores, against ~16 minutes for everything)::

    pytest -m "not slow"

Plain ``pytest``, what the README and CI run, still runs everything, both tiers. Mark a
new test ``slow`` when it takes more than ~2 s (``pytest --durations=20`` shows them).
"""

import sys
from pathlib import Path

import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "models"))


@pytest.fixture(autouse=True)
def _float64_and_seed():
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: tests read the reference data from ../shared/data")
    return SHARED_DATA


_REPORT_LINES = []


@pytest.fixture
def report():
    """Add lines to the fidelity report printed at the end of the test session."""

    def add(line: str) -> None:
        _REPORT_LINES.append(line)

    return add


def pytest_terminal_summary(terminalreporter):
    if _REPORT_LINES:
        terminalreporter.section("hbfl_pyro fidelity report")
        for line in _REPORT_LINES:
            terminalreporter.write_line(line)
