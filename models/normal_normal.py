"""A conjugate Normal–Normal hierarchy with known variances, and its exact posterior.

    mu            ~ Normal(MU0, S0)
    theta_i | mu  ~ Normal(mu, TAU)                  one per client
    y_ij | theta_i ~ Normal(theta_i, SIGMA)           j = 1..n_i, client i's data

Everything is Gaussian and linear, so the exact posterior is Gaussian
(:func:`exact_posterior`) and so is the mean-field VI optimum, the fixed point of
coordinate ascent (:func:`mean_field_optimum`). The server block is solved in closed
form (:class:`hbfl_pyro.NormalNormal`, detected automatically).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from hbfl_pyro import num_clients

MU0, S0, TAU, SIGMA = 0.0, 10.0, 2.0, 1.0


def model(data):
    mu = pyro.sample("mu", dist.Normal(MU0, S0))
    y, mask = data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, TAU))
        with pyro.plate("obs", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(theta, SIGMA), obs=y)


def load_data(num_clients: int = 10, seed: int = 1):
    """Synthetic clients with unequal sizes (3 to 30 observations)."""
    gen = torch.Generator().manual_seed(seed)
    mu = 3.0
    clients = {}
    for i in range(num_clients):
        n = int(torch.randint(3, 31, (), generator=gen))
        theta = mu + TAU * torch.randn((), generator=gen)
        clients[f"client{i:02d}"] = {"y": theta + SIGMA * torch.randn(n, generator=gen)}
    return clients


def _suff(data):
    ys = [torch.as_tensor(c["y"], dtype=torch.get_default_dtype()) for c in data.values()]
    return torch.tensor([len(y) for y in ys], dtype=torch.get_default_dtype()), torch.stack(
        [y.sum() for y in ys]
    )


def exact_posterior(data):
    """Exact joint posterior of ``(mu, theta_1..N)``: returns ``(mean, covariance)``."""
    n, s = _suff(data)
    N = len(n)
    # Precision of the joint Gaussian over (mu, theta).
    P = torch.zeros(N + 1, N + 1)
    P[0, 0] = 1 / S0**2 + N / TAU**2
    P[0, 1:] = P[1:, 0] = -1 / TAU**2
    P[1:, 1:] = torch.diag(1 / TAU**2 + n / SIGMA**2)
    b = torch.cat([torch.tensor([MU0 / S0**2]), s / SIGMA**2])
    cov = torch.linalg.inv(P)
    return cov @ b, cov


def mean_field_optimum(data):
    """The mean-field Gaussian optimum (coordinate ascent fixed point).

    For a Gaussian target, mean-field VI matches the exact posterior mean and has
    precisions equal to the diagonal of the joint precision matrix.
    Returns ``{"mu": (mean, sd), "theta": (means, sds)}``.
    """
    mean, _ = exact_posterior(data)
    n, _ = _suff(data)
    N = len(n)
    sd_mu = (1 / S0**2 + N / TAU**2) ** -0.5
    sd_theta = (1 / TAU**2 + n / SIGMA**2) ** -0.5
    return {"mu": (mean[0], torch.tensor(sd_mu)), "theta": (mean[1:], sd_theta)}


#: This file is the closed-form server's example (docs/flower.rst, docs/privacy.rst and the
#: Flower and SecAgg+ tests run it through the closed-form server): first-order options
#: ask for that server, and its clients fit their blocks by Adam, which needs these local
#: steps (with the default 10 steps at lr 0.05 a client's mean stopped 0.32 sd from the
#: exact posterior). Without fit_options, ``hbfl fit`` runs the second-order server,
#: exact on this Gaussian hierarchy in 3 rounds (tests/test_second_order.py).
fit_options = {"rounds": 60, "local_steps": 50, "local_lr": 0.05}
