"""The documentation builds with Sphinx, warnings as errors, and documents every public name.

The same command as CI's docs build, into a temporary folder:
``sphinx-build -W --keep-going -b html docs OUT``. Skipped when Sphinx is not installed
(``pip install -e ".[docs]"``). The API pages and the tutorial pages are generated from
the package and the notebooks during the build (``docs/conf.py``), so a docstring that
breaks reStructuredText, a module that fails to import, or a notebook that cannot be
converted fails here.
"""

import importlib
import inspect
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")
pytest.importorskip("sphinxarg")
pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PUBLIC_PACKAGES = (
    "hbfl_pyro",
    "hbfl_pyro.deep",
    "hbfl_pyro.engines",
    "hbfl_pyro.families",
    "hbfl_pyro.flower",
    "hbfl_pyro.guides",
    "hbfl_pyro.servers",
)


def _inventory(path: Path) -> set:
    """The object names of a Sphinx ``objects.inv`` (version 2: 4 header lines, zlib)."""
    with open(path, "rb") as f:
        for _ in range(4):
            f.readline()
        body = zlib.decompress(f.read()).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-E",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(DOCS),
            str(out / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"sphinx-build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return out / "html"


@pytest.mark.slow  # a full Sphinx build: about a minute on two cores
def test_docs_build_without_warnings(built):
    for page in (
        "index",
        "getting_started",
        "federated_model",
        "guides",
        "servers",
        "diagnostics",
        "privacy",
        "flower",
        "deep",
        "validation",
        "cli",
        "api/index",
        "tutorials/index",
        "tutorials/generated/quickstart",
        "results/index",
    ):
        assert (built / f"{page}.html").is_file(), page


@pytest.mark.slow  # a full Sphinx build: about a minute on two cores
def test_cli_reference_is_generated_from_the_parser(built):
    from hbfl_pyro.cli import build_parser

    html = (built / "cli.html").read_text()
    fit = next(
        action
        for action in build_parser()._actions
        if action.__class__.__name__ == "_SubParsersAction"
    ).choices["fit"]
    for action in fit._actions:
        if action.__class__.__name__ == "_HelpAction":
            continue  # sphinx-argparse leaves out -h/--help
        for flag in action.option_strings:
            assert flag in html, f"hbfl fit {flag} is missing from the CLI reference"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Flower's imports (typer/click)
def test_every_public_class_and_function_is_documented(built):
    names = _inventory(built / "objects.inv")
    missing = []
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            target = f"{obj.__module__}.{obj.__qualname__}"
            if target not in names:
                missing.append(f"{package}.{name} ({target})")
    assert not missing, f"not in the API reference: {missing}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_page_examples_run():
    """The ``>>>`` examples of the documentation's own pages run, as docstring examples do."""
    import doctest

    pages = sorted(p for p in DOCS.glob("*.rst") if ">>>" in p.read_text())
    assert pages, "no page has a >>> example"
    for page in pages:
        result = doctest.testfile(
            str(page),
            module_relative=False,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            verbose=False,
        )
        assert result.attempted > 0 and result.failed == 0, (
            f"{page.name}: {result.failed} of {result.attempted} example(s) failed"
        )
