"""Global guides beyond the Gaussian ones: a normalizing flow as ``q(phi)``.

A flow's transforms cache tensors of their last pass (not graph leaves), which
``copy.deepcopy`` refuses; every client keeps a copy of the server's global guide, so the
library copies guide modules without those caches (:func:`hbfl_pyro.guides.copy_module`).
"""

import functools

import normal_normal
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal

from hbfl_pyro import FederatedSVI
from hbfl_pyro.guides import copy_module


@pytest.mark.slow
def test_flow_global_guide_runs_federated_and_copies_cleanly():
    torch.set_default_dtype(torch.float64)
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=3),
        global_guide=functools.partial(AutoIAFNormal, hidden_dim=[8], num_transforms=1),
        server="gradient",
        local_steps=5,
        seed=0,
    )
    fit.run(30, progress=False)
    elbos = [r["elbo"] for r in fit.history]
    assert all(torch.isfinite(torch.tensor(elbos)))
    assert sum(elbos[-5:]) / 5 > sum(elbos[:5]) / 5  # it trains
    # The server's guide has been run (its transform holds a cache); its copy is
    # independent and draws what the original draws.
    original = fit.server.global_guide
    copy = copy_module(original)
    for (name, p), q in zip(original.named_parameters(), copy.parameters()):
        assert torch.equal(p, q) and p is not q, name
    torch.manual_seed(1)
    a = original(fit.data.placeholder())
    torch.manual_seed(1)
    b = copy(fit.data.placeholder())
    assert torch.equal(a["mu"], b["mu"])
