"""The PSIS check of a first-order fit (issue 13, point 3): its importance weights are
right, and its k-hat and moment gaps (of the globals and of every client's locals) tell a
good approximation from a poor one, in the verdict.

Tolerances: the self-normalised importance-sampling mean from 4000 draws with an
effective sample size near 2000 has a Monte Carlo error of about 0.03 posterior sd,
hence 0.15 sd; the shifted q is 0.5 sd off or more, so the check can fail.
"""

import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.guides import LaplaceLocalNormal
from hbfl_pyro.psis_check import joint_log_weights, psis_check
from hbfl_pyro.summary import posterior_summary
from hbfl_pyro.verdict import verdict_lines, verdict_problems

FAST = dict(server="gradient", local_steps=2, grad_particles=2, server_particles=2, seed=0)


def _fit(rounds, **options):
    data = normal_normal.load_data(num_clients=5)
    fit = FederatedSVI(normal_normal.model, data, **{**FAST, **options})
    fit.run(rounds, progress=False)
    return fit, data


def _exact_z(fit, data, client):
    """``|mean - exact mean| / exact sd`` of ``client``'s theta in ``fit``'s summary."""
    mean, cov = normal_normal.exact_posterior(data)
    rows = posterior_summary(fit, num_samples=20000, seed=0)
    i = next(i for i, r in enumerate(rows) if r["client"] == client)
    return abs(rows[i]["mean"] - mean[i].item()) / cov[i, i].sqrt().item()


def test_k_hat_flags_an_unconverged_fit_loudly():
    fit, _ = _fit(3)
    verdict = fit.verdict
    assert verdict["k_hat"] >= 0.7 and not verdict["reliable"]
    line, banner = verdict_lines(verdict)
    assert "UNRELIABLE" in line and banner is not None and "not trustworthy" in banner[1]


@pytest.mark.slow
def test_a_converged_fit_passes_and_the_weights_correct_a_shifted_q():
    # The exact conditional factor (Gaussian here): only q(phi) is fitted by first order.
    fit, data = _fit(None, local_guide=LaplaceLocalNormal)  # until the stopping rule holds
    first = fit.verdict
    assert first["status"] == "converged"
    assert first["k_hat"] < 0.5 and first["reliable"]
    assert verdict_lines(first)[1] is None  # no banner: the check passed
    assert fit.verdict == first  # the same round: the cached check
    assert psis_check(fit)["k_hat"] == pytest.approx(first["k_hat"])  # seeded by round
    # Move q(mu) off the posterior (and widen it, so importance sampling can work): the
    # weighted mean must still be the exact posterior mean.
    mean, cov = normal_normal.exact_posterior(data)
    exact_mean, exact_sd = mean[0].item(), cov[0, 0].sqrt().item()
    guide = fit.server.global_guide
    with torch.no_grad():
        guide.locs.mu += 0.7 * exact_sd
        guide.scales.mu *= 1.5
    log_w, values = joint_log_weights(fit, num_draws=4000)
    mu = values["mu"].reshape(-1)
    weights = torch.softmax(log_w, 0)
    assert abs(mu.mean().item() - exact_mean) / exact_sd > 0.5  # q itself is off ...
    assert abs((weights * mu).sum().item() - exact_mean) / exact_sd < 0.15  # ... corrected


@pytest.mark.slow
def test_an_undertrained_local_factor_is_named_and_really_is_off():
    # Two local steps of a mean-field factor a round: the stopping rule sees q(phi) still,
    # but a client's q_i stays ~0.35 exact sd off (its local steps jitter at a constant
    # step size). The check must flag it, name the client, and the client must really be
    # off against the exact posterior (0.25 sd: the fidelity target), so this is no
    # false alarm; the check's tolerance for 5 clients at ~700 effective draws is ~0.23 sd.
    fit, data = _fit(None)
    verdict = fit.verdict
    assert verdict["status"] == "converged" and verdict["k_hat"] < 0.5
    assert not verdict["reliable"]
    worst = verdict["local_worst"]
    client, site = worst.split("/")
    assert site == "theta"
    assert _exact_z(fit, data, client) > 0.25
    problems = verdict_problems(verdict)
    assert any("local factors" in p and repr(worst) in p for p in problems)


@pytest.mark.slow
def test_a_closed_form_fit_is_checked_too():
    # The closed-form server with first-order clients at their defaults: it stops
    # "converged" with a local factor off (measured: 0.34 exact sd); the same check now
    # runs on its family's q(phi) and says so.
    data = normal_normal.load_data()
    fit = FederatedSVI(normal_normal.model, data, server="closed_form", seed=0)
    with pytest.warns(UserWarning, match="local factors q_i"):
        fit.run(progress=False)
    verdict = fit.verdict
    assert verdict["status"] == "converged" and not verdict["reliable"]
    assert verdict["k_hat"] < 0.5  # k-hat alone would have passed it
    assert _exact_z(fit, data, verdict["local_worst"].split("/")[0]) > 0.25
