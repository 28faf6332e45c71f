"""External reference: eight schools against posteriordb's NUTS draws.

The reference (``../shared/data/reference_posteriors/eight_schools_posteriordb.json``)
summarises 10,000 NUTS draws of the non-centred model. Each fit uses the model file's
settings for its guide family (``fit_options``, and ``guide_options["structured"]``).

Mean-field VI is known to understate the spread of ``tau`` (and so of the ``theta``), so
for it only the means of ``mu`` and ``theta`` are asserted, within 0.3 reference sd. The
structured factor ``q_i(theta_i | phi)`` (mean and log-scale linear in the globals) must
meet the issue's targets on every parameter: mean within 0.25 reference sd, sd ratio in
[0.8, 1.2]. Seeds 0, 1, 2 gave max ``|z|`` 0.12-0.21 and sd ratios 0.89-1.03 over mu, tau
and the theta (300 rounds; the Monte Carlo error of the draws is below 0.01 sd), so the
bounds hold with margin for optimisation noise of that size. ``spline+laplace`` (the
Laplace factor, exact given the globals, with a full-rank ``q(phi)`` whose marginals are
learned by a spline; 600 rounds, ``guide_options``) must meet the same targets: seeds 0,
1, 2 gave max ``|z|`` 0.02-0.03 and sd ratios 0.98-1.12 (``tau`` 1.04, 1.12, 1.09, where
the Gaussian ``q(log tau)`` of ``laplace`` gives 1.19-1.21). Every
parameter's ``z`` and sd ratio is printed in the fidelity report.
"""

import json

import eight_schools
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.modelfile import load_model_file

# Long fits against an external reference: slow tier.
pytestmark = pytest.mark.slow

MODEL_FILE = eight_schools.__file__

NUM_DRAWS = 20000  # MC error of a posterior mean: sd / sqrt(20000) < 0.01 sd


_FITS = {}


def _fit(variant, guide):
    key = (variant, guide)
    if key not in _FITS:
        spec = load_model_file(f"{MODEL_FILE}:{variant}", guide=guide)
        fit = FederatedSVI(spec.model, spec.load_data(), seed=0, **spec.options)
        fit.run(spec.rounds, progress=False)
        _FITS[key] = fit
    return _FITS[key]


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


@pytest.mark.parametrize(
    "variant, guide",
    [
        ("noncentered", "mean-field"),
        ("noncentered", "structured"),
        ("noncentered", "spline+laplace"),
        ("centered", "mean-field"),
    ],
)
def test_eight_schools_against_posteriordb(variant, guide, shared_data, report):
    summary = _reference(shared_data)
    draws = _draws(_fit(variant, guide))
    label = f"{variant} {guide}"
    rows = [("mu", draws["mu"]), ("tau", draws["tau"])]
    rows += [(f"theta[{j + 1}]", draws["theta"][:, j]) for j in range(8)]
    z, ratios = {}, {}
    for name, values in rows:
        mean_ref, sd_ref = summary[name]["mean"], summary[name]["sd"]
        z[name] = (values.mean().item() - mean_ref) / sd_ref
        ratio = ratios[name] = values.std().item() / sd_ref
        report(
            f"eight schools {label:22s} {name:9s} mean {values.mean().item():7.3f} "
            f"(ref {mean_ref:7.3f})  z = {z[name]:+.3f}  sd ratio = {ratio:.3f}"
        )
    if guide in ("structured", "spline+laplace"):
        for name in z:
            assert abs(z[name]) <= 0.25, f"{name}: z = {z[name]:.3f}"
            assert 0.8 <= ratios[name] <= 1.2, f"{name}: sd ratio = {ratios[name]:.3f}"
    elif variant == "noncentered":
        for name in ["mu"] + [f"theta[{j + 1}]" for j in range(8)]:
            assert abs(z[name]) <= 0.3, f"{name}: z = {z[name]:.3f}"


def test_structured_local_guide_narrows_the_mean_field_gap(shared_data, report):
    """q_i(theta_i | phi) reaches a higher ELBO and a wider tau than mean-field q_i(theta_i)."""
    summary = _reference(shared_data)
    results = {}
    for guide in ("mean-field", "structured"):
        fit = _fit("noncentered", guide)
        torch.manual_seed(1)
        elbo = fit.elbo(num_particles=20000)  # MC sd of this estimate: ~0.01 nats
        tau_ratio = _draws(fit)["tau"].std().item() / summary["tau"]["sd"]
        results[guide] = (elbo, tau_ratio)
        report(
            f"eight schools noncentered {guide:10s} ELBO {elbo:.3f}  tau sd ratio {tau_ratio:.3f}"
        )
    assert results["structured"][0] > results["mean-field"][0] + 0.02
    assert results["structured"][1] > results["mean-field"][1]
