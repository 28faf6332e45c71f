"""Run a jupytext notebook cell by cell, as a script would, and record each cell's output.

``python docs/_ext/run_notebook.py NOTEBOOK.py OUT.json`` executes the notebook's code
cells in order in one namespace (``__name__ == "__main__"``, ``__file__`` set), with the
working directory and ``HBFL_NOTEBOOK_OUT`` as the caller sets them, and writes
``[{"stdout": ..., "figures": [...]}, ...]`` (one entry per cell, markdown cells empty):
the text the cell printed and the image files that appeared under ``HBFL_NOTEBOOK_OUT``
while it ran. ``docs/conf.py`` turns this into the executed tutorial pages.
"""

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

import jupytext

IMAGE_SUFFIXES = (".png", ".svg", ".jpg")


def _images(folder: Path):
    if not folder.is_dir():
        return {}
    return {
        str(p): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
    }


def main(notebook: str, out: str) -> int:
    path = Path(notebook).resolve()
    figures_dir = Path(os.environ["HBFL_NOTEBOOK_OUT"])
    nb = jupytext.read(path)
    namespace = {"__name__": "__main__", "__file__": str(path)}
    records = []
    status = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            records.append({"stdout": "", "figures": []})
            continue
        before = _images(figures_dir)
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(cell.source, str(path), "exec"), namespace)
        except Exception:
            buffer.write(traceback.format_exc())
            status = 1
        after = _images(figures_dir)
        new = sorted(p for p, t in after.items() if before.get(p) != t)
        records.append({"stdout": buffer.getvalue(), "figures": new})
        if status:
            break
    Path(out).write_text(json.dumps(records, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
