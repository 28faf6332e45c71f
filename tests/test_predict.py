"""New clients: the population predictive of their local sites, and personalisation."""

import io
import math

import eight_schools  # models/ is on sys.path (conftest.py)
import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.guides import local_moments
from hbfl_pyro.predict import new_client_predictive, personalise
from hbfl_pyro.seeding import seeded

# A new client's data, far from the population mean (float64: built at import, before
# conftest.py sets the default dtype).
NEW_Y = torch.tensor([5.1, 4.3, 6.0, 5.5], dtype=torch.float64)


def _state_bytes(fit) -> bytes:
    """The whole federation (round, server, every client, history), serialised."""
    buffer = io.BytesIO()
    torch.save(fit.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture
def normal_normal_fit():
    """Closed-form server. Moment-matched noise with 2 particles makes every client block's
    Monte Carlo objective exact (Gaussian-quadratic, see hbfl_pyro.noise), so a client's
    optimisation has no Monte Carlo error; a few rounds suffice (q(mu) need not converge:
    the checks below condition on whatever q(mu) the server holds)."""
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(),
        local_steps=10,
        num_particles=2,
        moment_matched=True,
    )
    fit.run(3, progress=False)
    return fit


def test_new_client_predictive_is_the_analytic_normal(normal_normal_fit):
    fit = normal_normal_fit
    m = float(fit.server.family_params["loc"])
    s = float(fit.server.family_params["scale"])
    n = 20000
    torch.manual_seed(9)
    expected_next = torch.rand(2)
    torch.manual_seed(9)
    draws = new_client_predictive(fit, num_samples=n, seed=1)["theta"]
    assert torch.equal(torch.rand(2), expected_next)  # the caller's RNG is untouched
    assert draws.shape == (n, 1)  # as fit.local_samples(n)["theta"][:, i]
    # theta_new = mu + tau * eps with mu ~ q(mu) = N(m, s): N(m, sqrt(s^2 + tau^2)).
    sd = math.sqrt(s**2 + normal_normal.TAU**2)
    # Monte Carlo standard errors of the mean and of the sd of n normal draws; 4 of them.
    assert abs(float(draws.mean()) - m) < 4 * sd / math.sqrt(n)
    assert abs(float(draws.std()) - sd) < 4 * sd / math.sqrt(2 * n)
    assert torch.equal(new_client_predictive(fit, num_samples=n, seed=1)["theta"], draws)


def test_personalise_is_the_conjugate_posterior_and_changes_nothing(normal_normal_fit):
    fit = normal_normal_fit
    before = _state_bytes(fit)
    rng_before = torch.get_rng_state()
    personal = personalise(fit, {"y": NEW_Y}, steps=500, lr=0.1, seed=0)
    # Nothing is sent back: the server, its history and every client are unchanged, byte
    # for byte, and so is the caller's random state.
    assert _state_bytes(fit) == before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert personal.name not in fit.clients

    # With q(mu) = N(m, s) as the prior, the optimal q(theta_new) is the posterior of
    # theta_new under the expected log prior E_q(mu)[log N(theta | mu, tau)], which is
    # log N(theta | m, tau) up to a constant: precision 1/tau^2 + n/sigma^2.
    m = float(fit.server.family_params["loc"])
    tau, sigma = normal_normal.TAU, normal_normal.SIGMA
    precision = 1 / tau**2 + len(NEW_Y) / sigma**2
    mean = (m / tau**2 + float(NEW_Y.sum()) / sigma**2) / precision
    got_mean, got_var = (t.detach() for t in local_moments(personal.client.local_guide, "theta"))
    # The objective is exact (moment-matched noise), so the only error is the optimiser's:
    # below 1e-10 after 500 Adam steps at lr 0.1; asserted with margin.
    assert float(got_mean) == pytest.approx(mean, abs=1e-7)
    assert float(got_var.sqrt()) == pytest.approx(precision**-0.5, abs=1e-7)
    draws = personal.sample(4000, seed=2)["theta"]
    assert draws.shape == (4000, 1)
    assert abs(float(draws.mean()) - mean) < 4 * precision**-0.5 / math.sqrt(4000)


def test_gradient_mode_eight_schools_new_school():
    fit = FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), local_steps=1)
    fit.run(2, progress=False)
    before = _state_bytes(fit)
    new_school = {"y": torch.tensor(20.0), "sigma": torch.tensor(5.0)}
    personal = personalise(fit, new_school, steps=50, lr=0.05, seed=0, name="I")
    assert _state_bytes(fit) == before
    assert math.isfinite(personal.elbo)
    assert personal.sample(10)["theta_trans"].shape == (10,)
    # The deterministic theta = mu + tau * theta_trans comes with the local draws, computed
    # from the same joint draw of q(phi) q(theta_new): recomputed here by hand.
    joint = personal.sample(200, seed=1)
    with seeded(1):
        phi = fit.global_samples(200)
    assert torch.allclose(joint["theta"], phi["mu"] + phi["tau"] * joint["theta_trans"])
    # Same seed, same result; the guide starts from the autoguide's own initialisation.
    again = personalise(fit, new_school, steps=50, lr=0.05, seed=0, name="I")
    assert torch.equal(
        again.sample(10, seed=3)["theta_trans"], personal.sample(10, seed=3)["theta_trans"]
    )

    # The predictive of a new school with its standard error: the local site from its prior
    # N(0, 1), the deterministic theta = mu + tau * theta_trans, and replicated y.
    n = 8000
    draws = new_client_predictive(fit, num_samples=n, seed=0, data=new_school)
    assert set(draws) == {"theta_trans", "theta", "y"}
    z = draws["theta_trans"]
    assert abs(float(z.mean())) < 4 / math.sqrt(n) and abs(float(z.std()) - 1) < 4 / math.sqrt(
        2 * n
    )
    resid = (draws["y"] - draws["theta"]) / 5.0  # y ~ N(theta, sigma = 5)
    assert abs(float(resid.mean())) < 4 / math.sqrt(n)
    assert abs(float(resid.std()) - 1) < 4 / math.sqrt(2 * n)


def test_personalise_errors(normal_normal_fit):
    fit = normal_normal_fit
    with pytest.raises(ValueError, match="already a client"):
        personalise(fit, {"y": NEW_Y}, steps=1, name="client00")
    with pytest.raises(ValueError, match="same keys"):
        personalise(fit, {"x": NEW_Y}, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        personalise(fit, {"y": torch.tensor([1.0, float("nan")])}, steps=1)
