"""Pooled SVI (:func:`hbfl_pyro.pooled.fit_pooled_svi`), the reference federated fits are
compared with, with any Pyro autoguide: here the full-rank ``AutoMultivariateNormal``, whose
family contains the exact posterior of the conjugate Normal–Normal model.

A full-rank Gaussian fitted by ``Trace_ELBO`` must recover that posterior's mean and whole
covariance. Tolerances: the fit ends with a learning rate decayed 100-fold and 16
particles, so what is left is stochastic-optimisation noise; over seeds 0, 1, 2 the worst
errors were 0.016 sd in the means, 4.5% in the variances and 0.021 in the correlations,
and the bounds below leave about twice that.
"""

import normal_normal
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from hbfl_pyro import FederatedData
from hbfl_pyro.pooled import fit_pooled_svi


@pytest.mark.slow
def test_full_rank_pooled_svi_recovers_the_exact_gaussian_posterior(report):
    torch.set_default_dtype(torch.float64)
    # One observation per client: the data pin each theta_i down only loosely, so the
    # posterior correlates it with mu (a mean-field fit could not represent that).
    clients = {n: {"y": c["y"][:1]} for n, c in normal_normal.load_data(num_clients=5).items()}
    mean, cov = normal_normal.exact_posterior(clients)
    guide, losses = fit_pooled_svi(
        normal_normal.model,
        FederatedData(clients),
        AutoMultivariateNormal(normal_normal.model),
        steps=3000,
        lr=0.05,
        lr_decay=0.01,
        num_particles=16,
        seed=0,
    )
    assert len(losses) == 3000
    with torch.no_grad():
        loc = guide.loc  # unconstrained = constrained here: every site has real support
        scale_tril = guide.scale[:, None] * guide.scale_tril
        fitted_cov = scale_tril @ scale_tril.T
    sd = cov.diagonal().sqrt()
    z = ((loc - mean) / sd).abs().max().item()
    var_ratio = (fitted_cov.diagonal() / cov.diagonal() - 1).abs().max().item()
    corr = fitted_cov / torch.outer(fitted_cov.diagonal().sqrt(), fitted_cov.diagonal().sqrt())
    exact_corr = cov / torch.outer(sd, sd)
    corr_err = (corr - exact_corr).abs().max().item()
    report(
        f"full-rank pooled SVI vs exact: max |z| {z:.3f}, max |var ratio - 1| "
        f"{var_ratio:.3f}, max |corr error| {corr_err:.3f}"
    )
    assert z < 0.05
    assert var_ratio < 0.10
    # The exact posterior correlates mu with every theta_i: a mean-field fit would be off
    # by that much.
    assert exact_corr[0, 1:].abs().min() > 0.2
    assert corr_err < 0.05
