"""Distributions that write in place run under torch.func while the library differentiates
a model (hbfl_pyro.functional): an ordinal model gets the second-order server (it fell
back to the gradient server, 180 rounds and a flagged posterior, in session 9's sweep)."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform
from torch.func import vmap

from hbfl_pyro import FederatedSVI, num_clients
from hbfl_pyro.functional import functional_distributions


def test_ordered_logistic_is_unchanged_and_runs_under_vmap():
    gen = torch.Generator().manual_seed(0)
    eta = torch.randn(6, 3, generator=gen)
    cuts = torch.tensor([-1.0, 0.2, 1.5])
    y = torch.randint(0, 4, (6, 3), generator=gen)
    plain = dist.OrderedLogistic(eta, cuts)
    with functional_distributions():
        same = dist.OrderedLogistic(eta, cuts)
        batched = vmap(lambda e: dist.OrderedLogistic(e, cuts).log_prob(y[0]))(eta)
    assert torch.equal(plain.probs, same.probs)  # the same numbers, bit for bit
    looped = torch.stack([dist.OrderedLogistic(e, cuts).log_prob(y[0]) for e in eta])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-15)
    # Restored on exit: Pyro's own constructor, which vmap refuses.
    try:
        vmap(lambda e: dist.OrderedLogistic(e, cuts).log_prob(y[0]))(eta)
    except RuntimeError as exc:
        assert "inplace" in str(exc)
    else:
        raise AssertionError("OrderedLogistic's constructor was not restored")


def ordinal_model(data):
    cutpoints = pyro.sample(
        "cutpoints",
        dist.TransformedDistribution(
            dist.Normal(0.0, 2.0).expand([3]).to_event(1), OrderedTransform()
        ),
    )
    b_x = pyro.sample("b_x", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    y, x, mask = data["y"], data["x"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        with pyro.plate("obs", y.shape[-1], dim=-1), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.OrderedLogistic(u + b_x * x, cutpoints), obs=y)


def test_an_ordinal_model_gets_the_second_order_server():
    gen = torch.Generator().manual_seed(1)
    cuts = torch.tensor([-1.5, 0.0, 1.5])
    clients = {}
    for i in range(6):
        x = torch.randn(20, generator=gen)
        latent = 0.5 * torch.randn((), generator=gen) + 0.8 * x
        uniform = torch.rand(20, generator=gen)
        latent = latent + torch.log(uniform / (1 - uniform))  # standard logistic noise
        clients[f"r{i}"] = {"y": (latent[:, None] > cuts).sum(-1), "x": x}
    fit = FederatedSVI(ordinal_model, clients, seed=0, psis_draws=300)
    assert fit.server_choice["server"] == "second_order", fit.server_choice
    fit.run(progress=False)
    assert fit.verdict["status"] == "converged" and fit.verdict["reliable"]
    draws = fit.global_samples(500)
    assert draws["cutpoints"].shape == (500, 3)
    assert bool((draws["cutpoints"].diff(dim=-1) > 0).all())  # ordered, as the prior says


def dirichlet_model(data):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    kappa = pyro.sample("kappa", dist.LogNormal(2.0, 1.0))
    y, mask = data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        p = pyro.sample("p", dist.Dirichlet(kappa.unsqueeze(-1) * w))
        with pyro.plate("obs", y.shape[-1], dim=-1), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Categorical(probs=p), obs=y)


def test_simplex_locals_get_the_second_order_server():
    """A local simplex has one value fewer unconstrained (K - 1): the Laplace marginal
    works in those coordinates (session 9's sweep: this model fell back to the gradient
    server, 100 rounds, k-hat 0.96, flagged)."""
    gen = torch.Generator().manual_seed(2)
    clients = {}
    for i in range(6):
        p = torch.softmax(torch.tensor([0.3 * i, 0.2, -0.1 * i]), 0)  # stores differ
        clients[f"s{i}"] = {"y": torch.multinomial(p, 25, replacement=True, generator=gen)}
    fit = FederatedSVI(dirichlet_model, clients, seed=0, psis_draws=300)
    assert fit.server_choice["server"] == "second_order", fit.server_choice
    fit.run(progress=False)
    assert fit.verdict["status"] == "converged"
    p = fit.local_samples(200)["p"]
    assert p.shape == (200, 6, 1, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(200, 6, 1))  # on the simplex
    # Each store's posterior mean follows its own counts (25 draws each): within 0.15 of
    # its empirical frequencies (the prior's pull, kappa ~ e^2 against n = 25, is smaller).
    for i, client in enumerate(clients.values()):
        freq = torch.bincount(client["y"], minlength=3).double() / 25
        assert float((p[:, i, 0].mean(0) - freq).abs().max()) < 0.15
