"""The guide factors' old module paths still import, for one release, and say where they went.

``hbfl_pyro.structured``, ``hbfl_pyro.laplace`` and ``hbfl_pyro.spline_guide`` moved into
the :mod:`hbfl_pyro.guides` package (issue 16); each old path is a shim that re-exports
the same objects and warns with a ``DeprecationWarning`` naming the new path.
"""

import importlib
import sys

import pytest

import hbfl_pyro.guides

MOVED = {
    "hbfl_pyro.structured": ("hbfl_pyro.guides.structured", ["StructuredLocalNormal"]),
    "hbfl_pyro.laplace": ("hbfl_pyro.guides.laplace", ["LaplaceLocalNormal", "MAX_LOCAL_SIZE"]),
    "hbfl_pyro.spline_guide": ("hbfl_pyro.guides.spline", ["AutoSplineMultivariateNormal"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_imports_and_warns(old, monkeypatch):
    new, names = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import warns again
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(shim, name) is getattr(target, name)
    assert sorted(shim.__all__) == sorted(names)


def test_the_package_has_every_moved_name():
    for new, names in MOVED.values():
        for name in names:
            if name.isupper():  # module constants stay on their module
                continue
            assert getattr(hbfl_pyro.guides, name) is getattr(importlib.import_module(new), name)
