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


@pytest.fixture(scope="module")
def second_order_fit():
    """Normal–Normal by the second-order server: the Laplace marginals are exact
    (Gaussian), so its PSIS-resampled draws of mu are draws of the exact posterior; 400
    PSIS draws keep the fit short (their Monte Carlo error is counted below)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # (module scope: before conftest's fixture)
    try:
        fit = FederatedSVI(
            normal_normal.model, normal_normal.load_data(), server="second_order", psis_draws=400
        )
        fit.run(progress=False)
    finally:
        torch.set_default_dtype(previous)
    assert fit.verdict["reliable"]
    return fit


def test_personalise_second_order_is_the_conditional_posterior(second_order_fit):
    fit = second_order_fit
    before = _state_bytes(fit)
    rng_before = torch.get_rng_state()
    personal = personalise(fit, {"y": NEW_Y}, seed=0)
    n = 4000
    theta = personal.sample(n, seed=2)["theta"]
    # Nothing is sent back, and the caller's random state is untouched.
    assert _state_bytes(fit) == before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert personal.name not in fit.clients
    assert theta.shape == (n, 1)  # as the first-order path, fit.local_samples(n)[:, i]

    # For each posterior draw of mu the new client's theta is drawn from p(theta | mu,
    # D_new) = N(c mu + (1 - c) ybar_w, 1/P), P = 1/tau^2 + n/sigma^2, c = 1/(tau^2 P);
    # mu ~ p(mu | D) = N(m, v) (exact_posterior), so theta ~ N(c m + S/(sigma^2 P),
    # 1/P + c^2 v). The Gaussian conditional makes the importance-resampled locals exact.
    mean, cov = normal_normal.exact_posterior(normal_normal.load_data())
    m, v = float(mean[0]), float(cov[0, 0])
    tau, sigma = normal_normal.TAU, normal_normal.SIGMA
    precision = 1 / tau**2 + len(NEW_Y) / sigma**2
    c = 1 / (tau**2 * precision)
    expected_mean = c * m + float(NEW_Y.sum()) / (sigma**2 * precision)
    expected_sd = math.sqrt(1 / precision + c**2 * v)
    # Monte Carlo error: n draws of theta, and mu resampled from only 400 PSIS draws
    # (their mean errs by sqrt(v / 400), moving theta's by c times that); 4 standard
    # errors each. The sd's error: sd / sqrt(2 n), plus the spread of the 400 mu draws
    # (relative error 1/sqrt(2 * 400) in v, weighted by c^2 v / sd^2 in the variance).
    mean_err = math.sqrt(expected_sd**2 / n + c**2 * v / 400)
    sd_err = expected_sd / math.sqrt(2 * n) + c**2 * v / expected_sd / math.sqrt(2 * 400)
    assert abs(float(theta.mean()) - expected_mean) < 4 * mean_err
    assert abs(float(theta.std()) - expected_sd) < 4 * sd_err
    # Same seed, same draws; another seed, other draws of the locals.
    assert torch.equal(personal.sample(n, seed=2)["theta"], theta)
    assert not torch.equal(personal.sample(n, seed=3)["theta"], theta)

    # elbo = E[log p(D_new | mu)] over the fit's 256 posterior draws of mu (each term exact:
    # Gaussian conditional). y_new | mu ~ N(mu 1, Sigma), Sigma = sigma^2 I + tau^2 11', so
    # the term is quadratic in mu: log N(y; m 1, Sigma) - a/2 ((mu - b)^2 - (m - b)^2), with
    # a = 1' Sigma^-1 1 and b = 1' Sigma^-1 y / a. Its mean over mu ~ N(m, v) is
    # log N(y; m 1, Sigma) - a v / 2, its sd a sqrt(v^2 / 2 + v (m - b)^2); the 256 draws
    # are resampled from 400 PSIS draws (both errors counted; 4 standard errors).
    k = len(NEW_Y)
    sigma_y = sigma**2 * torch.eye(k) + tau**2 * torch.ones(k, k)
    a = float(torch.ones(k) @ torch.linalg.solve(sigma_y, torch.ones(k)))
    b = float(torch.ones(k) @ torch.linalg.solve(sigma_y, NEW_Y)) / a
    exact = torch.distributions.MultivariateNormal(m * torch.ones(k), sigma_y)
    expected_elbo = float(exact.log_prob(NEW_Y)) - a * v / 2
    term_sd = a * math.sqrt(v**2 / 2 + v * (m - b) ** 2)
    assert abs(personal.elbo - expected_elbo) < 4 * term_sd * math.sqrt(1 / 256 + 1 / 400)


def test_personalise_second_order_errors(second_order_fit):
    fit = second_order_fit
    with pytest.raises(ValueError, match="already a client"):
        personalise(fit, {"y": NEW_Y}, name="client00")
    with pytest.raises(ValueError, match="same keys"):
        personalise(fit, {"x": NEW_Y})
    with pytest.raises(ValueError, match="local_guide= is for first-order fits"):
        personalise(fit, {"y": NEW_Y}, local_guide=object)
    with pytest.raises(ValueError, match="num_particles= is for first-order fits"):
        personalise(fit, {"y": NEW_Y}, num_particles=4)
    unfitted = FederatedSVI(normal_normal.model, normal_normal.load_data(), server="second_order")
    with pytest.raises(ValueError, match="run it"):
        personalise(unfitted, {"y": NEW_Y})


def test_new_client_predictive_second_order(second_order_fit):
    """The population predictive needs only the fit's global draws: theta_new ~ N(mu, tau)
    with mu ~ p(mu | D) = N(m, v), so N(m, sqrt(v + tau^2))."""
    fit = second_order_fit
    n = 8000
    theta = new_client_predictive(fit, num_samples=n, seed=1)["theta"]
    assert theta.shape == (n, 1)
    mean, cov = normal_normal.exact_posterior(normal_normal.load_data())
    m, v = float(mean[0]), float(cov[0, 0])
    sd = math.sqrt(v + normal_normal.TAU**2)
    # n draws of theta; mu from 400 PSIS draws (its mean errs by sqrt(v / 400)).
    assert abs(float(theta.mean()) - m) < 4 * math.sqrt(sd**2 / n + v / 400)
    assert abs(float(theta.std()) - sd) < 4 * (sd / math.sqrt(2 * n) + v / sd / math.sqrt(800))


@pytest.mark.slow
def test_personalise_second_order_eight_schools_deterministic_site():
    """The default (second-order) server on the non-centred eight schools: the new school's
    theta = mu + tau * theta_trans comes from the same joint draw as its theta_trans."""
    fit = FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), psis_draws=300)
    fit.run(progress=False)
    assert fit.server.mode == "second_order"
    new_school = {"y": torch.tensor(20.0), "sigma": torch.tensor(5.0)}
    personal = personalise(fit, new_school, name="I")
    assert math.isfinite(personal.elbo)
    joint = personal.sample(200, seed=1)
    assert set(joint) == {"theta_trans", "theta"}
    assert joint["theta_trans"].shape == (200,)
    phi = fit.global_samples(200)
    assert torch.allclose(joint["theta"], phi["mu"] + phi["tau"] * joint["theta_trans"])
