"""The structured local factor ``q_i(theta_i | phi)`` (:class:`~hbfl_pyro.StructuredLocalNormal`).

Its density is checked against an independent formula: in unconstrained space
``z_i ~ Normal(a_i + B_i u, s_i exp(C_i u))`` with ``u`` the unconstrained globals, and
``log q(theta_i) = log Normal(z_i) - log |d theta / d z|``. Covered: a scalar local site with
positive support (a log Jacobian per element), a vector local site with a
``MultivariateNormal`` prior (support ``real_vector``: its transform already sums over the
event dim) and a Cholesky-factor global (its unconstrained shape differs from its value's),
as in the sleepstudy model.
"""

import math

import pyro.distributions as dist
import pytest
import sleepstudy
import torch
from conditional_guides import factor_for, positive_local
from pyro import poutine

from hbfl_pyro import FederatedSVI, StructuredLocalNormal
from hbfl_pyro.guides import private_params


def _guide(model, clients):
    return factor_for(StructuredLocalNormal, model, clients)


def _randomise(guide, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _log_q(guide, batch, globals_):
    with private_params():
        trace = poutine.trace(guide).get_trace(batch, globals=globals_)
    trace.compute_log_prob()
    return trace


def test_positive_local_site_density_matches_the_formula():
    torch.set_default_dtype(torch.float64)
    clients = {f"c{i}": {"y": torch.tensor(float(i) + 0.5)} for i in range(3)}
    guide, batch = _guide(positive_local, clients)
    _randomise(guide)
    globals_ = {"mu": torch.tensor(0.4), "tau": torch.tensor(1.7)}
    trace = _log_q(guide, batch, globals_)
    u = torch.tensor([0.4, math.log(1.7)])  # unconstrained (mu, log tau)
    with private_params():
        a, b = guide.locs.scale, guide.slopes.scale
        s, c = guide.scales.scale, guide.scale_slopes.scale
        loc, scale = a + b @ u, s * torch.exp(c @ u)
    z = trace.nodes["scale_unconstrained"]["value"]
    theta = trace.nodes["scale"]["value"]
    assert torch.allclose(theta, z.exp())
    expected = dist.Normal(loc, scale).log_prob(z) - z  # log |d exp(z)/dz| = z
    got = trace.nodes["scale_unconstrained"]["log_prob"] + trace.nodes["scale"]["log_prob"]
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.fixture(scope="module")
def sleepstudy_clients():
    torch.set_default_dtype(torch.float64)
    clients = sleepstudy.load_data()
    return {n: clients[n] for n in list(clients)[:3]}


def test_vector_local_site_and_cholesky_global(sleepstudy_clients):
    guide, batch = _guide(sleepstudy.model, sleepstudy_clients)
    _randomise(guide, seed=1)
    # Four particles of the globals, laid out as the library passes them (left of the
    # model's two plate dims).
    gen = torch.Generator().manual_seed(2)
    corr = dist.LKJCholesky(2, 2.0).sample((4,))
    globals_ = {
        "beta": torch.randn(4, 1, 1, 2, generator=gen),
        "tau": torch.rand(4, 1, 1, 2, generator=gen) + 0.1,
        "L": corr.reshape(4, 1, 1, 2, 2),
        "sigma": torch.rand(4, 1, 1, generator=gen) + 0.1,
    }
    trace = _log_q(guide, batch, globals_)
    b = trace.nodes["b"]["value"]
    assert b.shape == (4, 3, 1, 2)
    # u: beta (2) + log tau (2) + one unconstrained Cholesky coordinate + log sigma = 6.
    support = dist.LKJCholesky(2, 2.0).support
    u = torch.cat(
        [
            globals_["beta"],
            globals_["tau"].log(),
            torch.distributions.biject_to(support).inv(globals_["L"]),
            globals_["sigma"].log().unsqueeze(-1),
        ],
        -1,
    )
    assert u.shape[-1] == 6
    with private_params():
        a, slope = guide.locs.b, guide.slopes.b
        s, c = guide.scales.b, guide.scale_slopes.b
        u_site = u.unsqueeze(-2)  # (4, 1, 1, 1, 6) against (3, 1, 2, 6)
        loc = a + (slope * u_site).sum(-1)
        scale = s * (c * u_site).sum(-1).exp()
    expected = dist.Normal(loc, scale).log_prob(b).sum(-1)  # identity transform: no Jacobian
    got = trace.nodes["b_unconstrained"]["log_prob"] + trace.nodes["b"]["log_prob"]
    assert got.shape == (4, 3, 1)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.slow
def test_structured_sleepstudy_fits_federated(sleepstudy_clients):
    """The whole path on sleepstudy (it used to fail on the vector site): a few rounds,
    vectorised engine, gradient server; the ELBO rises from the start."""
    fit = FederatedSVI(
        sleepstudy.model,
        sleepstudy_clients,
        local_guide=StructuredLocalNormal,
        server="gradient",
        engine="vectorised",
        num_particles=8,
        seed=0,
    )
    fit.run(60, progress=False)
    elbos = [r["elbo"] for r in fit.history]
    assert all(math.isfinite(e) for e in elbos)
    assert sum(elbos[-10:]) / 10 > sum(elbos[:10]) / 10


def test_recentring_changes_coordinates_not_the_distribution(sleepstudy_clients):
    """``recentre`` moves the features' centre and shifts ``a``, ``s`` to compensate: the
    density of every (z, phi) pair is unchanged (to rounding), the centre is where asked."""
    guide, batch = _guide(sleepstudy.model, sleepstudy_clients)
    _randomise(guide, seed=3)
    gen = torch.Generator().manual_seed(4)
    globals_ = {
        "beta": torch.randn(4, 1, 1, 2, generator=gen),
        "tau": torch.rand(4, 1, 1, 2, generator=gen) + 0.1,
        "L": dist.LKJCholesky(2, 2.0).sample((4,)).reshape(4, 1, 1, 2, 2),
        "sigma": torch.rand(4, 1, 1, generator=gen) + 0.1,
    }
    before = _log_q(guide, batch, globals_)
    z = before.nodes["b_unconstrained"]["value"]
    elsewhere = {k: v * 1.5 + 0.3 for k, v in globals_.items() if k != "L"}
    elsewhere["L"] = globals_["L"]
    with private_params():
        guide.recentre(elsewhere)
        centre = guide._features(elsewhere).reshape(-1, 6).mean(0)
        assert torch.allclose(guide.centres.b, centre.expand_as(guide.centres.b))
        conditioned = poutine.condition(guide, data={"b_unconstrained": z})
        after = poutine.trace(conditioned).get_trace(batch, globals=globals_)
    after.compute_log_prob()
    got = after.nodes["b_unconstrained"]["log_prob"]
    assert torch.allclose(got, before.nodes["b_unconstrained"]["log_prob"], atol=1e-12)
