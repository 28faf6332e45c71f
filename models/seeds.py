"""Seeds: germination on 21 plates (BUGS Examples Vol. 1, "Seeds"): one client per plate.

Plate ``i`` holds ``N_i`` seeds of type ``x1_i`` (0: O. aegyptiaco 75, 1: O. aegyptiaco 73)
on root extract ``x2_i`` (0: bean, 1: cucumber), of which ``n_i`` germinated. The random
effects logistic regression, with the priors of posteriordb's ``seeds_stanified_model``::

    alpha0, alpha1, alpha2, alpha12 ~ Normal(0, 1)
    sigma                           ~ HalfCauchy(1)
    b_i | sigma                     ~ Normal(0, sigma)              i = 1..21, one per plate
    n_i | alpha, b_i                ~ Binomial(N_i, logit^-1(alpha0 + alpha1 x1_i
                                               + alpha2 x2_i + alpha12 x1_i x2_i + b_i))

Global sites: the fixed effects ``alpha0``, ``alpha1``, ``alpha2``, ``alpha12`` (they enter
the likelihood, so the server runs in gradient mode) and ``sigma``. Local site: ``b``
(centred) or ``b_raw`` (non-centred, ``b = sigma * b_raw`` recorded as a deterministic
site). ``model = noncentered``, the parametrisation of the reference sampler. Each plate's
single binomial count says little about its ``b_i`` next to ``sigma`` (posterior sd of
``b_i`` 0.24-0.35, ``sigma`` about 0.33), and mean-field VI understates ``sigma`` either
way: measured, ``z`` about -0.6 for ``sigma`` in the non-centred model (which has the
higher ELBO; pooled SVI agrees) and -0.3 in the centred one; the four fixed effects are
strongly correlated, so their mean-field sds are 0.4 of the reference's
(``tests/test_zoo.py`` reports both parametrisations).

Data: the BUGS data (posteriordb ``seeds_data``, commit 28f8d3d6, whose names are used:
``n`` germinated, ``N`` seeds on the plate; BUGS calls them ``r`` and ``n``), embedded
below. Each plate holds its own ``(n_i, N_i, x1_i, x2_i)``, four per-client scalars.

Reference posterior: ``../shared/data/reference_posteriors/seeds_stanified_selfgen.json``
(NumPyro NUTS, 40,000 draws, self-generated; used by ``tests/test_zoo.py``).
"""

import pyro
import pyro.distributions as dist
import torch

from hbfl_pyro import num_clients

PLATES = [f"plate{i:02d}" for i in range(1, 22)]
#: Germinated seeds ``n_i``, seeds on the plate ``N_i``, seed type ``x1_i``, extract ``x2_i``.
GERMINATED = [10, 23, 23, 26, 17, 5, 53, 55, 32, 46, 10, 8, 10, 8, 23, 0, 3, 22, 15, 32, 3]
SEEDS = [39, 62, 81, 51, 39, 6, 74, 72, 51, 79, 13, 16, 30, 28, 45, 4, 12, 41, 30, 51, 7]
X1 = [0] * 11 + [1] * 10
X2 = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def load_data():
    """``{plate: {"n": germinated, "N": seeds, "x1": type, "x2": extract}}``."""
    return {
        name: {
            "n": torch.tensor(float(n)),
            "N": torch.tensor(float(total)),
            "x1": torch.tensor(float(x1)),
            "x2": torch.tensor(float(x2)),
        }
        for name, n, total, x1, x2 in zip(PLATES, GERMINATED, SEEDS, X1, X2)
    }


def _fixed_effects(data):
    alpha0 = pyro.sample("alpha0", dist.Normal(0.0, 1.0))
    alpha1 = pyro.sample("alpha1", dist.Normal(0.0, 1.0))
    alpha2 = pyro.sample("alpha2", dist.Normal(0.0, 1.0))
    alpha12 = pyro.sample("alpha12", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    x1, x2 = data["x1"], data["x2"]
    eta = alpha0 + alpha1 * x1 + alpha2 * x2 + alpha12 * x1 * x2
    return eta, sigma


def centered(data):
    """The Stan model as written: ``b_i ~ Normal(0, sigma)`` sampled directly."""
    eta, sigma = _fixed_effects(data)
    with pyro.plate("clients", num_clients(data)):
        b = pyro.sample("b", dist.Normal(0.0, sigma))
        pyro.sample("n", dist.Binomial(total_count=data["N"], logits=eta + b), obs=data["n"])


def noncentered(data):
    """``b_raw_i ~ Normal(0, 1)``, ``b_i = sigma * b_raw_i``: the same posterior."""
    eta, sigma = _fixed_effects(data)
    with pyro.plate("clients", num_clients(data)):
        b_raw = pyro.sample("b_raw", dist.Normal(0.0, 1.0))
        b = pyro.deterministic("b", sigma * b_raw)
        pyro.sample("n", dist.Binomial(total_count=data["N"], logits=eta + b), obs=data["n"])


model = noncentered

#: The mean-field settings (``hbfl fit --guide mean-field``, ``tests/test_zoo.py``), measured to
#: reach the pooled-SVI (mean-field) optimum; moment-matched noise (``hbfl_pyro.noise``) quiets the
#: clients' gradient estimates enough for 200 rounds.
ROUNDS = 200
MEAN_FIELD = {
    "rounds": ROUNDS,
    "local_steps": 2,
    "local_lr": 0.1,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 16,
    "grad_particles": 16,
    "server_lr": 0.2,
    "lr_decay_over_run": 0.01,
    "server_particles": 16,
    "moment_matched": True,
    "engine": "vectorised",
}

#: Settings per guide family (``hbfl fit --guide FAMILY``), over the mean-field settings: the
#: richer families have more parameters per client and a flatter ELBO near the optimum, so
#: they run longer, settle with a 100-fold decay of both step sizes and average over 32
#: particles. Measured (``benchmarks/zoo_fidelity.py``, seed 0, centred model):
#: full+struct ELBO -63.6 (structured -64.8), global max |z| 0.10 with sd ratios 0.69-0.94,
#: local max |z| 0.10 with sd ratios 0.92-1.01.
_RICH = {
    "rounds": 1500,
    "lr_decay_over_run": 0.01,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 32,
    "grad_particles": 32,
    "server_particles": 32,
}
#: The Laplace families (``LaplaceLocalNormal``: each plate's conditional found by Newton's
#: method, so q(b_i | phi) follows the shrinkage exactly) need no long run: 300 rounds.
#: full+laplace (seed 0, ``benchmarks/zoo_fidelity.py``): ELBO -63.43, global max |z| 0.02
#: with sd ratios 0.83-0.98 (sigma 0.83, 0.69 with full+struct), local max |z| 0.04 with sd
#: ratios 0.92-0.99, federated vs pooled VI 0.049 pooled sd; laplace (mean-field q(phi))
#: 0.06 with 0.54-0.84: the four fixed effects are correlated a posteriori.
_LAPLACE = {**_RICH, "rounds": 300}
#: No ``fit_options``: ``hbfl fit models/seeds.py`` runs the library's defaults (the second-order
#: server, nothing to tune). Measured with defaults only (``benchmarks/results/tuning_free.md``):
#: seeds centred and non-centred: 15-16 Newton rounds, every mean within 0.06 NUTS sd, sd ratios
#: 0.92-1.05. The first-order families keep the settings above (``--guide FAMILY``): first-order
#: servers need step sizes, and these were measured to reach the pooled-SVI optimum.
guide_options = {
    "mean-field": MEAN_FIELD,
    **{
        family: {**MEAN_FIELD, **_RICH}
        for family in ("structured", "full-rank", "low-rank", "full+struct")
    },
    "laplace": {**MEAN_FIELD, **_LAPLACE},
    "full+laplace": {**MEAN_FIELD, **_LAPLACE},
}
