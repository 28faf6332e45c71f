"""Surgical mortality in 12 hospitals (BUGS Examples Vol. 1, "Surgical"): one client per hospital.

Hospital ``i`` performed ``n_i`` cardiac operations on babies, ``r_i`` of which ended in
death. The random-effects model (the BUGS model and priors, as posteriordb's
``surgical_model``)::

    mu            ~ Normal(0, 1000)
    sigmasq       ~ InverseGamma(0.001, 0.001)        sigma = sqrt(sigmasq)
    b_i | mu, sigma ~ Normal(mu, sigma)               i = 1..12, one per hospital
    r_i | b_i     ~ Binomial(n_i, logit^-1(b_i))

Global sites: ``mu`` and ``sigmasq`` (no conjugate family matches an unknown-scale Normal
with a Binomial likelihood, so the server runs in gradient mode). Local site: ``b``
(``centered``; ``mu`` and ``sigmasq`` then enter only the prior of the ``b_i``) or
``b_raw`` (``noncentered``: ``b = mu + sigma * b_raw`` is recorded as a deterministic site,
and ``mu`` and ``sigmasq`` enter the likelihood). ``model = noncentered``, the
parametrisation of the reference sampler. With 47 to 810 operations per hospital the data
pin each ``b_i`` down about as well as the population does, so there is no funnel here:
mean-field VI on the *centred* model is the closer approximation (higher ELBO, every
posterior mean within 0.25 reference sd), while on the non-centred one it understates
``sigma`` (``z`` about -0.4 for ``sigma`` and ``sigmasq``, pooled or federated);
``tests/test_zoo.py`` reports both. The InverseGamma(0.001, 0.001) prior on ``sigmasq`` is
the extremely vague BUGS choice; it is kept as is, so that the posterior is the
reference's (its draws reach ``sigmasq`` ~ 1e300, far outside anything the fit visits).

Data: the classic BUGS data (posteriordb ``surgical_data``, commit 28f8d3d6), embedded
below; each hospital holds its own ``(n_i, r_i)``, two per-client scalars.

Reference posterior: ``../shared/data/reference_posteriors/surgical_selfgen.json``
(NumPyro NUTS, 40,000 draws, self-generated; used by ``tests/test_zoo.py``).
"""

import pyro
import pyro.distributions as dist
import torch

from hbfl_pyro import num_clients

HOSPITALS = [f"hospital{i:02d}" for i in range(1, 13)]
#: Operations ``n_i`` and deaths ``r_i`` per hospital (BUGS "Surgical").
N_OPS = [47, 148, 119, 810, 211, 196, 148, 215, 207, 97, 256, 360]
DEATHS = [0, 18, 8, 46, 8, 13, 9, 31, 14, 8, 29, 24]


def load_data():
    """``{hospital: {"n": operations, "r": deaths}}``; two per-client scalars each."""
    return {
        name: {"n": torch.tensor(float(n)), "r": torch.tensor(float(r))}
        for name, n, r in zip(HOSPITALS, N_OPS, DEATHS)
    }


def _globals():
    mu = pyro.sample("mu", dist.Normal(0.0, 1000.0))
    sigmasq = pyro.sample("sigmasq", dist.InverseGamma(0.001, 0.001))
    return mu, sigmasq.sqrt()


def centered(data):
    """The BUGS parametrisation: ``b_i ~ Normal(mu, sigma)`` sampled directly."""
    mu, sigma = _globals()
    with pyro.plate("clients", num_clients(data)):
        b = pyro.sample("b", dist.Normal(mu, sigma))
        pyro.sample("r", dist.Binomial(total_count=data["n"], logits=b), obs=data["r"])


def noncentered(data):
    """``b_raw_i ~ Normal(0, 1)``, ``b_i = mu + sigma * b_raw_i``: the same posterior."""
    mu, sigma = _globals()
    with pyro.plate("clients", num_clients(data)):
        b_raw = pyro.sample("b_raw", dist.Normal(0.0, 1.0))
        b = pyro.deterministic("b", mu + sigma * b_raw)
        pyro.sample("r", dist.Binomial(total_count=data["n"], logits=b), obs=data["r"])


# The centred model is the default here: with 47 to 810 operations per hospital there is
# no funnel, and mean-field VI on it has the higher ELBO (-54.7 vs -55.0) and every mean
# within 0.22 reference sd, while on the non-centred model it understates sigma (z ~ -0.4).
model = centered

#: The mean-field settings (``hbfl fit --guide mean-field``, ``tests/test_zoo.py``), measured to
#: reach the pooled-SVI (mean-field) optimum of the non-centred model, which needs more rounds than
#: the centred one (the location ``mu`` and the 12 ``b_raw`` move together along a ridge).
ROUNDS = 500
MEAN_FIELD = {
    "rounds": ROUNDS,
    "local_steps": 2,
    "local_lr": 0.2,
    "local_lr_decay_over_run": 0.05,
    "num_particles": 16,
    "grad_particles": 16,
    "server_lr": 0.4,
    "lr_decay_over_run": 0.05,
    "server_particles": 16,
    "engine": "vectorised",
}

#: Settings per guide family (``hbfl fit --guide FAMILY``), over the mean-field settings: the
#: richer families have more parameters per client and a flatter ELBO near the optimum, so
#: they run longer, settle with a 100-fold decay of both step sizes and average over 32
#: particles. Measured (``benchmarks/zoo_fidelity.py``, seed 0, centred model):
#: global max |z| 0.07 (structured and full+struct) with sd ratios 0.70-0.86, local max
#: |z| 0.06 with sd ratios 0.88-1.01.
_RICH = {
    "rounds": 1500,
    "lr_decay_over_run": 0.01,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 32,
    "grad_particles": 32,
    "server_particles": 32,
}
#: The Laplace families (``LaplaceLocalNormal``: each hospital's conditional found by
#: Newton's method, so q(b_i | phi) follows the shrinkage exactly) need no long run: 300
#: rounds (about a minute). laplace (seed 0, ``benchmarks/zoo_fidelity.py``): ELBO -53.99,
#: global max |z| 0.06 with sd ratios 0.86-0.87 (sigmasq 0.87, 0.73 with structured), local
#: max |z| 0.07 with sd ratios 0.93-1.01, federated vs pooled VI 0.025 pooled sd;
#: full+laplace 0.04 with 0.87-0.88.
_LAPLACE = {**_RICH, "rounds": 300}
#: No ``fit_options``: ``hbfl fit models/surgical.py`` runs the library's defaults (the second-
#: order server, nothing to tune). Measured with defaults only
#: (``benchmarks/results/tuning_free.md``): surgical centred and non-centred: 8 Newton rounds,
#: every mean within 0.06 NUTS sd, sd ratios 0.90-1.05. The first-order families keep the settings
#: above (``--guide FAMILY``): first-order servers need step sizes, and these were measured to
#: reach the pooled-SVI optimum.
guide_options = {
    "mean-field": MEAN_FIELD,
    **{
        family: {**MEAN_FIELD, **_RICH}
        for family in ("structured", "full-rank", "low-rank", "full+struct")
    },
    "laplace": {**MEAN_FIELD, **_LAPLACE},
    "full+laplace": {**MEAN_FIELD, **_LAPLACE},
}
