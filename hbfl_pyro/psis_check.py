"""The PSIS check of a gradient-mode fit: is ``q(phi) prod_i q_i(theta_i | phi)`` close to
the posterior? (issue 13, point 3).

The server draws ``phi_s ~ q(phi)`` and keeps ``log p(phi_s) - log q(phi_s)``; each
client returns one number per draw, ``log p(theta_i, D_i | phi_s) - log q_i(theta_i |
phi_s)`` at one draw of its own factor (:meth:`Client.psis_log_ratios
<hbfl_pyro.client.Client.psis_log_ratios>`), so the server never sees data; the sum is
the joint approximation's importance log-weight against the model, and
``arviz.psislw``'s Pareto k-hat says whether it is usable (< 0.7). Exponentiated, each
client's number is an unbiased estimate of ``p(D_i | phi_s)``: the weights are those of
importance sampling the globals' marginal posterior, with the clients' factors as
proposals for their locals. A poor factor anywhere (a global or any client's local)
raises k-hat: it checks the whole approximation, loudly.

The second-order server has its own PSIS round
(:class:`~hbfl_pyro.servers.second_order.SecondOrderServer`).

Example::

    >>> import torch, pyro, pyro.distributions as dist
    >>> from hbfl_pyro import FederatedSVI, num_clients
    >>> def model(data):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("clients", num_clients(data)):
    ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
    >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(4)}
    >>> fit = FederatedSVI(model, clients, server="gradient", local_steps=5, seed=0)
    >>> _ = fit.run(30, progress=False)
    >>> check = psis_check(fit, num_draws=200)
    >>> sorted(check)
    ['draws', 'k_hat', 'q_mean_shift', 'q_sd_ratio', 'q_worst_site', 'unevaluated_draws']
"""

from __future__ import annotations

import math
from typing import Dict

import arviz as az
import numpy as np
import torch

from .elbo import server_log_ratios
from .guides import private_params
from .seeding import derive_seed, seeded

#: Draws of ``q(phi)`` in the check (each client evaluates each once).
CHECK_DRAWS = 1000


def joint_log_weights(fit, num_draws: int = CHECK_DRAWS):
    """The check's importance log-weights ``(num_draws,)`` and the draws of the globals
    they belong to (``{site: value}``, shaped as in the particle plate).

    :raises ValueError: for a fit whose server is not in gradient mode.
    """
    if fit.server.mode != "gradient":
        raise ValueError(f"the PSIS check needs a gradient-mode fit, not {fit.server.mode!r}")
    seed_round = -1 - fit.round  # messages like elbo()'s: no training round's seeds
    with private_params(), torch.no_grad(), seeded(derive_seed(fit.seed, "psis", fit.round)):
        log_w, values = server_log_ratios(
            fit.model,
            fit.server.global_guide,
            fit.server.placeholder,
            fit.structure,
            num_draws,
        )
    for name, client in fit.clients.items():
        message = fit.server.message(seed_round, name)
        log_w = log_w + client.psis_log_ratios(message, values, num_draws)
    return log_w, values


def psis_check(fit, num_draws: int = CHECK_DRAWS) -> Dict:
    """Pareto k-hat of the joint approximation of a gradient-mode ``fit``, as it stands,
    and how far q(phi)'s own moments are from the PSIS-weighted ones.

    :returns: ``{"k_hat", "draws", "unevaluated_draws", "q_mean_shift", "q_sd_ratio",
        "q_worst_site"}``: the share of draws some client could not evaluate (they get no
        weight); the largest ``|mean_q - mean_w| / sd_w`` over every global value; the
        range ``(min, max)`` of ``sd_q / sd_w``; the global site of the worst value (``_w``:
        weighted by the smoothed importance weights, the posterior's moments when k-hat
        < 0.7). A mean-field fit that shrinks a scale's sd shows it here even when its
        k-hat looks good (eight schools, mean-field: k-hat 0.48, tau's ``sd_q / sd_w``
        about 0.75).
    :raises ValueError: for a fit whose server is not in gradient mode.
    """
    log_w, values = joint_log_weights(fit, num_draws)
    log_w = log_w.detach().double()
    unevaluated = ~torch.isfinite(log_w)
    log_w = torch.where(unevaluated, torch.tensor(-math.inf, dtype=log_w.dtype), log_w)
    smoothed, k_hat = az.psislw(log_w.numpy().copy(), reff=1.0)
    check = {
        "k_hat": float(np.asarray(k_hat)),
        "draws": num_draws,
        "unevaluated_draws": float(unevaluated.double().mean()),
    }
    check.update(_moment_gaps(values, torch.from_numpy(np.exp(smoothed)), num_draws))
    return check


def _moment_gaps(values: Dict[str, torch.Tensor], weights: torch.Tensor, num_draws: int) -> Dict:
    """q's own moments of every global value against the importance-weighted ones."""
    shift, low, high, worst, worst_gap = 0.0, math.inf, 0.0, None, -1.0
    for site, draws in values.items():
        flat = draws.detach().double().reshape(num_draws, -1)
        q_mean, q_sd = flat.mean(0), flat.std(0)
        w_mean = (weights[:, None] * flat).sum(0)
        w_sd = ((weights[:, None] * (flat - w_mean) ** 2).sum(0)).clamp_min(1e-300).sqrt()
        site_shift = ((q_mean - w_mean).abs() / w_sd).max()
        ratio = q_sd / w_sd
        gap = float(torch.maximum(site_shift, (ratio.log().abs()).max()))
        shift = max(shift, float(site_shift))
        low, high = min(low, float(ratio.min())), max(high, float(ratio.max()))
        if gap > worst_gap:
            worst, worst_gap = site, gap
    return {"q_mean_shift": shift, "q_sd_ratio": (low, high), "q_worst_site": worst}


# How close q's own moments must be to the weighted ones: half the fidelity targets (0.25
# sd, sd ratio 0.8-1.2), because at a finite number of draws the weighted moments lean
# towards q's own: on eight schools' mean-field fit (k-hat 0.48) the weighted tau sd is
# 1.13x q's where posteriordb's is 1.43x.
#: Largest ``|mean_q - mean_w| / sd_w`` of a first-order fit's q that still counts as close.
MEAN_SHIFT_OK = 0.15
#: Range of ``sd_q / sd_w`` that still counts as close.
SD_RATIO_OK = (0.9, 1.1)


def moments_close(check: Dict) -> bool:
    """Whether q's own moments are within :data:`MEAN_SHIFT_OK` and :data:`SD_RATIO_OK` of
    the importance-weighted ones (what a first-order fit reports is q's own)."""
    low, high = check["q_sd_ratio"]
    return (
        check["q_mean_shift"] <= MEAN_SHIFT_OK and SD_RATIO_OK[0] <= low and high <= SD_RATIO_OK[1]
    )


__all__ = [
    "CHECK_DRAWS",
    "MEAN_SHIFT_OK",
    "SD_RATIO_OK",
    "joint_log_weights",
    "moments_close",
    "psis_check",
]
