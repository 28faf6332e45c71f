"""Eight schools (Rubin 1981; Gelman et al., BDA3 §5.5): one client per school.

Each school is a client holding its own estimated coaching effect ``y`` and its standard
error ``sigma``. Globals: the population mean ``mu`` and spread ``tau``; local: each
school's true effect ``theta``. Both parametrisations are here: ``centered`` samples
``theta`` directly (a funnel for VI and NUTS alike), ``noncentered`` samples a standard
normal ``theta_trans`` and records ``theta = mu + tau * theta_trans``.

Reference posterior: posteriordb ``eight_schools_noncentered`` (``../shared/data``).
"""

import pyro
import pyro.distributions as dist
import torch

from hbfl_pyro import num_clients

SCHOOLS = ["A", "B", "C", "D", "E", "F", "G", "H"]
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def load_data():
    """``{school: {"y": effect, "sigma": standard error}}``; one observation per client."""
    return {
        school: {"y": torch.tensor(y), "sigma": torch.tensor(s)}
        for school, y, s in zip(SCHOOLS, Y, SIGMA)
    }


def centered(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("clients", num_clients(data)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


def noncentered(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("clients", num_clients(data)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


model = noncentered

#: No fit options: ``hbfl fit models/eight_schools.py`` runs the library's defaults (the
#: second-order server: converged in 4 Newton rounds + one PSIS round, every mean within
#: 0.05 posteriordb sd, sd ratios 0.99-1.05).
#:
#: The first-order families' settings (``hbfl fit --guide mean-field``, ...): the settings
#: that ``tests/test_fed_vs_pooled.py`` shows reach the pooled-SVI optimum. Stochastic
#: first-order steps need them; the second-order server needs none.
ROUNDS = 300
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
}

#: ``spline+laplace`` learns each global's marginal shape as well (a spline's knots): 600
#: rounds. Seeds 0-2, against the posteriordb reference: tau's sd ratio 1.04-1.12, where
#: the Gaussian q(log tau) of ``laplace`` gives 1.19-1.21
#: (benchmarks/results/zoo_fidelity_laplace.md, tests/test_eight_schools_reference.py).
guide_options = {
    family: MEAN_FIELD
    for family in (
        "mean-field",
        "structured",
        "full-rank",
        "low-rank",
        "full+struct",
        "laplace",
        "full+laplace",
    )
}
guide_options["spline+laplace"] = {**MEAN_FIELD, "rounds": 600}
