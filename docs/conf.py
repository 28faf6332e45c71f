"""Sphinx configuration of the hbfl_pyro documentation.

Build: ``pip install -e ".[docs]"`` then ``sphinx-build -W --keep-going -b html docs
docs/_build/html``. The API reference (``api/generated/``) is written at build time from
the package itself, one page per public module, so it follows the code: every name in a
module's ``__all__`` (or, without ``__all__``, every public class and function defined
there and every module attribute with a ``#:`` doc comment) is documented where it is
defined, and a package's page lists what it re-exports. The tutorials
(``tutorials/generated/``) are the jupytext notebooks of ``notebooks/`` converted to
markdown, also at build time; ``HBFL_DOCS_EXECUTE=smoke`` (or ``full``) runs them first
and shows each cell's printed output and figures (``docs/_ext/run_notebook.py``). The
recorded benchmark tables (``benchmarks/results/*.md``) become ``results/generated/``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", category=FutureWarning, message=r"(?s).*arviz.*")
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")

import hbfl_pyro  # noqa: E402

project = "hbfl_pyro"
author = "the hbfl_pyro authors"
copyright = "the hbfl_pyro authors, Apache-2.0"
release = version = hbfl_pyro.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinxarg.ext",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# Keep "--flag" as typed (the CLI reference's descriptions): no en dashes from "--".
smartquotes_action = "qe"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
# The Flower modules import Flower at import time; it is an optional extra.
try:
    import flwr  # noqa: F401
except ImportError:
    # Mocked for this whole build: the API pages below import the modules themselves.
    from sphinx.ext.autodoc.mock import MockFinder

    autodoc_mock_imports = ["flwr"]
    sys.meta_path.insert(0, MockFinder(autodoc_mock_imports))

napoleon_google_docstring = True
napoleon_numpy_docstring = True

try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # pragma: no cover
    html_theme = "alabaster"
html_title = f"hbfl_pyro {release}"

# ---------------------------------------------------------------------- API reference
PACKAGE = "hbfl_pyro"
#: Not documented: the entry point, and the old guide paths kept for one release as
#: deprecation shims (their names are documented under :mod:`hbfl_pyro.guides`).
SKIP_MODULES = {
    "hbfl_pyro.__main__",
    "hbfl_pyro.laplace",
    "hbfl_pyro.spline_guide",
    "hbfl_pyro.structured",
}


def public_modules():
    """Every importable public module of the package, the package first."""
    names = [PACKAGE]
    for info in pkgutil.walk_packages(hbfl_pyro.__path__, prefix=PACKAGE + "."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        if info.name not in SKIP_MODULES:
            names.append(info.name)
    return sorted(names)


def _defines(module, name):
    """Whether ``module``'s own source assigns ``name`` (for data, which has no
    ``__module__``)."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return re.search(rf"^{re.escape(name)}\s*[:=]", source, re.M) is not None


def _documented_attributes(modname):
    from sphinx.pycode import ModuleAnalyzer

    try:
        analyzer = ModuleAnalyzer.for_module(modname)
        return [name for (scope, name) in analyzer.find_attr_docs() if scope == ""]
    except Exception:
        return []


def module_entries(modname):
    """``(own, reexported)``: names documented on this module's page as
    ``(directive, name)``, and names it re-exports as ``(name, target)``."""
    module = importlib.import_module(modname)
    all_names = getattr(module, "__all__", None)
    if all_names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == modname
        ]
        names += [n for n in _documented_attributes(modname) if n not in names]
    else:
        names = list(all_names)
    own, reexported = [], []
    for name in names:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        home = (
            getattr(obj, "__module__", None)
            if (inspect.isclass(obj) or inspect.isfunction(obj))
            else None
        )
        if home is not None and home != modname and home.startswith(PACKAGE):
            reexported.append((name, f"{home}.{name}"))
            continue
        if home is None and not _defines(module, name):
            target = _find_definition(modname, name)
            if target is not None:
                reexported.append((name, target))
                continue
        if inspect.isclass(obj):
            directive = "autoexception" if issubclass(obj, BaseException) else "autoclass"
        elif callable(obj) and not inspect.isclass(obj):
            directive = "autofunction"
        else:
            directive = "autodata"
        own.append((directive, name))
    return own, reexported


def _find_definition(package, name):
    """Where a package's data name is defined (one of its submodules), or ``None``."""
    module = importlib.import_module(package)
    if not hasattr(module, "__path__"):
        return None
    for info in pkgutil.iter_modules(module.__path__, prefix=package + "."):
        sub = importlib.import_module(info.name)
        if hasattr(sub, name) and _defines(sub, name):
            return f"{info.name}.{name}"
    return None


def module_page(modname):
    module = importlib.import_module(modname)
    own, reexported = module_entries(modname)
    lines = [f"``{modname}``", "=" * (len(modname) + 4), "", f".. automodule:: {modname}", ""]
    if reexported:
        lines += [
            ".. rubric:: Re-exported names",
            "",
            ".. list-table::",
            "   :widths: 30 70",
            "",
        ]
        for name, target in reexported:
            lines += [f"   * - ``{name}``", f"     - :py:obj:`{target}`"]
        lines.append("")
    for directive, name in own:
        lines += [f".. {directive}:: {modname}.{name}"]
        if directive in ("autoclass", "autoexception"):
            lines += ["   :members:", "   :undoc-members:"]
        elif directive == "autodata" and len(repr(getattr(module, name))) > 120:
            lines += ["   :no-value:"]  # a long repr (a dict of classes) helps no one
        lines.append("")
    return "\n".join(lines)


def write_api_pages(app=None):
    out = DOCS / "api" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for modname in public_modules():
        wanted[f"{modname}.rst"] = module_page(modname)
    rows = [".. list-table::", "   :header-rows: 1", "   :widths: 35 65", ""]
    rows += ["   * - module", "     - what it holds"]
    for modname in public_modules():
        doc = inspect.getdoc(importlib.import_module(modname)) or ""
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        rows += [f"   * - :doc:`{modname} <generated/{modname}>`", f"     - {summary}"]
    wanted["overview.txt"] = "\n".join(rows) + "\n"
    for stale in out.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for filename, text in wanted.items():
        path = out / filename
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


# ---------------------------------------------------------------------- tutorials
NOTEBOOKS = ROOT / "notebooks"
#: ``HBFL_DOCS_EXECUTE=smoke`` (or ``1``) runs each notebook at its small sizes before the
#: build and shows each cell's printed output and figures under it; ``full`` runs the full
#: analyses; unset (the default, and the test suite's build), the pages show code only.
#: A run is cached under ``tutorials/generated/_run/`` and redone when its notebook changes.
EXECUTE = os.environ.get("HBFL_DOCS_EXECUTE", "").strip().lower()


def _execute(path, out):
    """Run one notebook (``docs/_ext/run_notebook.py``); ``(records, folder)`` or ``None``."""
    import hashlib
    import json
    import subprocess

    from sphinx.util import logging

    smoke = EXECUTE != "full"
    key = hashlib.sha256(path.read_bytes() + (b"smoke" if smoke else b"full")).hexdigest()
    folder = out / "_run" / path.stem
    records_file, key_file = folder / "outputs.json", folder / "key"
    if not (key_file.exists() and key_file.read_text() == key and records_file.exists()):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        env = dict(os.environ, HBFL_NOTEBOOK_OUT=str(folder), MPLBACKEND="Agg")
        env["PYTHONWARNINGS"] = "ignore"
        if smoke:
            env["HBFL_SMOKE"] = "1"
        else:
            env.pop("HBFL_SMOKE", None)
        proc = subprocess.run(
            [sys.executable, str(DOCS / "_ext" / "run_notebook.py"), str(path), str(records_file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            logging.getLogger(__name__).warning(
                "notebooks/%s failed when run for the docs:\n%s", path.name, proc.stderr[-3000:]
            )
        else:
            key_file.write_text(key)
    if not records_file.exists():
        return None
    return json.loads(records_file.read_text()), folder


def notebook_markdown(path, out):
    """A tutorial page: the notebook's prose and code, with its outputs when executed."""
    import jupytext

    notebook = jupytext.read(path)
    run = _execute(path, out) if EXECUTE else None
    records, folder = run if run is not None else ([{}] * len(notebook.cells), None)
    parts = []
    for cell, record in zip(notebook.cells, records):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            continue
        parts.append(f"```python\n{cell.source}\n```")
        text = record.get("stdout", "").rstrip()
        if text:
            parts.append(f"```text\n{text}\n```")
        for figure in record.get("figures", []):
            rel = Path(figure).relative_to(out).as_posix()
            parts.append(f"![{Path(figure).stem}]({rel})")
    mode = {"": "not executed", "full": "executed at full sizes"}.get(
        EXECUTE, "executed at smoke sizes"
    )
    parts.append(
        f"---\n\nSource: `notebooks/{path.name}`, a jupytext percent-format script (this "
        f"page: {mode}). Run it with `python notebooks/{path.name}`."
    )
    return "\n\n".join(parts) + "\n"


def write_tutorials(app=None):
    """One markdown page per notebook of ``notebooks/``."""
    out = DOCS / "tutorials" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(NOTEBOOKS.glob("*.py")):
        text = notebook_markdown(path, out)
        target = out / f"{path.stem}.md"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


# ---------------------------------------------------------------------- benchmark results
RESULTS = ROOT / "benchmarks" / "results"


def write_results(app=None):
    """One page per recorded benchmark table (``benchmarks/results/*.md``), as recorded."""
    out = DOCS / "results" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for path in sorted(RESULTS.glob("*.md")):
        text = path.read_text()
        if not text.lstrip().startswith("# "):
            text = f"# {path.stem}\n\n{text}"
        wanted[path.name] = text + f"\n\n---\n\nRecorded in `benchmarks/results/{path.name}`.\n"
    for stale in out.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        target = out / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


# ---------------------------------------------------------------------- references
def _home(dotted):
    """Where the object named ``dotted`` (``hbfl_pyro....``) is documented, or ``None``:
    a class or function at ``module.qualname``, a method or attribute under its class."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        break
    else:
        return None
    owner = None
    for attr in parts[cut:]:
        try:
            value = (
                inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
            )
        except AttributeError:
            return None
        if inspect.isclass(obj):
            owner = obj
            # The class that defines it (inherited members are documented there).
            for klass in obj.__mro__:
                if attr in vars(klass):
                    owner = klass
                    break
        obj = value
    if inspect.isclass(obj) or inspect.isfunction(obj):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module.startswith(PACKAGE):
            return f"{module}.{obj.__qualname__}"
    if owner is not None and owner.__module__.startswith(PACKAGE):
        return f"{owner.__module__}.{owner.__qualname__}.{parts[-1]}"
    return None


def resolve_reexports(app, env, node, contnode):
    """Resolve a reference to a re-exported name (``hbfl_pyro.FederatedSVI``,
    ``hbfl_pyro.Server.select``, or ``simulate`` inside :mod:`hbfl_pyro.flower`) to where
    the object is documented."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    module, klass = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        if klass:
            candidates.append(f"{module}.{klass}.{target}")
        candidates.append(f"{module}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        if not candidate.startswith(PACKAGE + "."):
            continue
        home = _home(candidate)
        if home is None or home == candidate and candidate == target:
            continue
        found = domain.resolve_xref(
            env, node.get("refdoc"), app.builder, node.get("reftype"), home, node, contnode
        )
        if found is not None:
            return found
        found = domain.resolve_any_xref(env, node.get("refdoc"), app.builder, home, node, contnode)
        if found:
            return found[0][1]
    return None


def drop_type_docstrings(app, what, name, obj, options, lines):
    """A module constant without a ``#:`` comment would show its type's docstring (a dict's,
    a tuple's): show none."""
    if what in ("data", "attribute") and lines:
        type_doc = inspect.getdoc(type(obj)) or ""
        if "\n".join(lines).strip() == type_doc.strip():
            lines.clear()


def protect_attribute_prose(app, what, name, obj, options, lines):
    """Napoleon reads ``Text: more`` on an attribute's or property's first line as
    ``type: description``; this package's docstrings are prose (``How the fit ended:
    ...``), so keep a first line whose part before the colon has spaces as prose."""
    if what in ("attribute", "data", "property") and lines:
        head = lines[0].split(": ", 1)[0]
        if ": " in lines[0] and "`" not in head and " " in head.strip():
            # An empty comment first: napoleon takes it as the "type-less" first line.
            lines[:0] = ["..", ""]


def setup(app):
    app.connect("autodoc-process-docstring", protect_attribute_prose, priority=100)
    app.connect("autodoc-process-docstring", drop_type_docstrings)
    app.connect("builder-inited", write_api_pages)
    app.connect("builder-inited", write_tutorials)
    app.connect("builder-inited", write_results)
    app.connect("missing-reference", resolve_reexports)
