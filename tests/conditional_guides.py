"""Shared by the tests of the conditional local factors (``test_structured.py``,
``test_laplace.py``): a model with a positive local site, and a factor built for a set of
clients as the library builds it."""

import pyro
import pyro.distributions as dist

from hbfl_pyro import FederatedData, discover_structure
from hbfl_pyro.guides import private_params


def positive_local(data):
    """Each client's positive local ``scale`` (LogNormal), its ``y`` Normal with that scale."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("clients", data["y"].shape[0]):
        scale = pyro.sample("scale", dist.LogNormal(mu, tau))
        pyro.sample("y", dist.Normal(0.0, scale), obs=data["y"])


def factor_for(guide_class, model, clients):
    """``guide_class.for_client`` on the collated ``clients``; returns (guide, batch)."""
    data = FederatedData(clients)
    structure = discover_structure(model, data)
    with private_params():
        guide = guide_class.for_client(model, structure, data.collate())
    return guide, data.collate()
