"""External reference: eight schools against posteriordb's NUTS draws.

The reference (``../shared/data/reference_posteriors/eight_schools_posteriordb.json``)
summarises 10,000 NUTS draws of the non-centred model. Mean-field VI is known to understate
the spread of ``tau`` (and so of the ``theta``), so only the means of ``mu`` and ``theta``
are asserted, within 0.3 reference sd (the issue's bound); every parameter's ``z`` and sd
ratio is printed in the fidelity report, for both parametrisations.
"""

import json

import eight_schools
import pytest
import torch

from hbfl_pyro import FederatedSVI, StructuredLocalNormal

NUM_DRAWS = 20000  # MC error of a posterior mean: sd / sqrt(20000) < 0.01 sd


_FITS = {}


def _fit(model, local_guide="auto"):
    key = (model.__name__, str(local_guide))
    if key in _FITS:
        return _FITS[key]
    rounds = 300
    fit = FederatedSVI(
        model,
        eight_schools.load_data(),
        local_guide=local_guide,
        seed=0,
        local_steps=2,
        local_lr=0.1,
        local_lr_decay=0.01 ** (1 / rounds),
        num_particles=16,
        grad_particles=16,
        server_lr=0.2,
        lr_decay=0.01 ** (1 / rounds),
        server_particles=16,
    )
    fit.run(rounds, progress=False)
    _FITS[key] = fit
    return fit


def _draws(fit):
    torch.manual_seed(0)
    draws = dict(fit.global_samples(NUM_DRAWS))
    local = fit.local_samples(NUM_DRAWS, global_draws=draws)
    if "theta" in local:
        draws["theta"] = local["theta"]
    else:  # non-centred: theta = mu + tau * theta_trans
        draws["theta"] = draws["mu"][:, None] + draws["tau"][:, None] * local["theta_trans"]
    return draws


def _reference(shared_data):
    path = shared_data / "reference_posteriors" / "eight_schools_posteriordb.json"
    return json.loads(path.read_text())["reference_summary"]


GUIDES = {"mean-field": "auto", "structured": StructuredLocalNormal}


@pytest.mark.parametrize(
    "variant, guide",
    [("noncentered", "mean-field"), ("noncentered", "structured"), ("centered", "mean-field")],
)
def test_eight_schools_against_posteriordb(variant, guide, shared_data, report):
    summary = _reference(shared_data)
    draws = _draws(_fit(getattr(eight_schools, variant), GUIDES[guide]))
    variant = f"{variant} {guide}"
    rows = [("mu", draws["mu"]), ("tau", draws["tau"])]
    rows += [(f"theta[{j + 1}]", draws["theta"][:, j]) for j in range(8)]
    z = {}
    for name, values in rows:
        mean_ref, sd_ref = summary[name]["mean"], summary[name]["sd"]
        z[name] = (values.mean().item() - mean_ref) / sd_ref
        ratio = values.std().item() / sd_ref
        report(
            f"eight schools {variant:22s} {name:9s} mean {values.mean().item():7.3f} "
            f"(ref {mean_ref:7.3f})  z = {z[name]:+.3f}  sd ratio = {ratio:.3f}"
        )
    if variant.startswith("noncentered"):
        for name in ["mu"] + [f"theta[{j + 1}]" for j in range(8)]:
            assert abs(z[name]) <= 0.3, f"{name}: z = {z[name]:.3f}"


def test_structured_local_guide_narrows_the_mean_field_gap(shared_data, report):
    """q_i(theta_i | phi) reaches a higher ELBO and a wider tau than mean-field q_i(theta_i)."""
    summary = _reference(shared_data)
    results = {}
    for guide in GUIDES:
        fit = _fit(eight_schools.noncentered, GUIDES[guide])
        torch.manual_seed(1)
        elbo = fit.elbo(num_particles=20000)  # MC sd of this estimate: ~0.01 nats
        tau_ratio = _draws(fit)["tau"].std().item() / summary["tau"]["sd"]
        results[guide] = (elbo, tau_ratio)
        report(
            f"eight schools noncentered {guide:10s} ELBO {elbo:.3f}  tau sd ratio {tau_ratio:.3f}"
        )
    assert results["structured"][0] > results["mean-field"][0] + 0.02
    assert results["structured"][1] > results["mean-field"][1]
