"""The PSIS check of a gradient-mode fit (issue 13, point 3): its importance weights are
right, and its k-hat tells a good approximation from a poor one, in the verdict.

Tolerances: the self-normalised importance-sampling mean from 4000 draws with an
effective sample size near 2000 has a Monte Carlo error of about 0.03 posterior sd,
hence 0.15 sd; the shifted q is 0.5 sd off or more, so the check can fail.
"""

import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.psis_check import joint_log_weights, psis_check
from hbfl_pyro.verdict import verdict_lines

FAST = dict(server="gradient", local_steps=2, grad_particles=2, server_particles=2, seed=0)


def _fit(rounds):
    data = normal_normal.load_data(num_clients=5)
    fit = FederatedSVI(normal_normal.model, data, **FAST)
    fit.run(rounds, progress=False)
    return fit, data


def test_k_hat_flags_an_unconverged_fit_loudly():
    fit, _ = _fit(3)
    verdict = fit.verdict
    assert verdict["k_hat"] >= 0.7 and not verdict["reliable"]
    line, banner = verdict_lines(verdict)
    assert "UNRELIABLE" in line and banner is not None and "not trustworthy" in banner[1]


@pytest.mark.slow
def test_a_converged_fit_passes_and_the_weights_correct_a_shifted_q():
    fit, data = _fit(None)  # until the stopping rule holds
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
