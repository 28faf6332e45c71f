"""The guide factors' old module paths still import, for one release, and say where they went.

``hbfl_pyro.structured``, ``hbfl_pyro.laplace`` and ``hbfl_pyro.spline_guide`` moved into
the :mod:`hbfl_pyro.guides` package (issue 16); each old path is a shim that re-exports
the same objects and warns with a ``DeprecationWarning`` naming the new path.
"""

import importlib
import sys

import pytest
import torch

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


# --------------------------------------------------------------------------------------
# The deep trainers' former engine names (issue 17 point 4): "loop" / "vmap" are now the
# core's "inprocess" / "vectorised"; the old names work for one release and warn.
# --------------------------------------------------------------------------------------


def _deep_fits():
    from hbfl_pyro.deep import Ditto, FedHB, FedProx, FlatNet, LocalSpec, PerFedAvg, iso_prior, mlp

    def make(cls, engine, **kw):
        torch.manual_seed(0)
        net = mlp((4, 5, 3))
        gen = torch.Generator().manual_seed(1)
        clients = [
            (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for n in (12, 7, 9)
        ]
        if cls is FedHB:
            kw["family"] = iso_prior(FlatNet(net).vector())
        return cls(net, clients, local=LocalSpec(batch_size=4), engine=engine, seed=2, **kw)

    return [(FedProx, {"mu": 0.1}), (FedHB, {"eps": 0.1}), (Ditto, {}), (PerFedAvg, {})], make


@pytest.mark.parametrize("old,new", [("loop", "inprocess"), ("vmap", "vectorised")])
def test_deep_engine_names_warn_and_give_the_same_result(old, new):
    fits, make = _deep_fits()
    for cls, kw in fits:
        with pytest.warns(DeprecationWarning, match=f'engine="{old}" is deprecated') as caught:
            before = make(cls, old, **kw)
        assert caught[0].filename == __file__  # names the caller's line
        after = make(cls, new, **kw)
        assert before.engine == after.engine == new
        before.run(2)
        after.run(2)
        assert torch.equal(before.global_weights(), after.global_weights()), cls.__name__


def test_deep_engine_names_unknown_is_an_error():
    from hbfl_pyro.deep import FedProx, mlp

    with pytest.raises(ValueError, match="'inprocess' or 'vectorised'"):
        FedProx(mlp((2, 2)), [(torch.zeros(3, 2), torch.zeros(3))], engine="threads")
