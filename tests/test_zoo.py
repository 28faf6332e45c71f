"""The model zoo: radon, surgical, seeds and sleepstudy, fitted federated.

- Structure: every zoo model splits into the expected global, local, observed (and
  deterministic) sites, with the expected globals inside the likelihood, and runs in the
  expected server mode.
- Surgical and seeds (external references, evaluation.md §A.4): each file's mean-field
  fit (``guide_options["mean-field"]``), both parametrisations, against the NumPyro NUTS
  summaries in ``../shared/data/reference_posteriors``. Every parameter's
  ``z = (mean_VI - mean_ref) / sd_ref`` and ``sd_VI / sd_ref`` goes to the fidelity report,
  with max and median ``|z|`` over the global and over the local parameters. The asserted
  bounds are what the mean-field family reaches here (measured against long pooled-SVI
  fits of the same family), plus room for the fits' Monte Carlo noise; see ``BOUNDS``.
- Surgical with the ``laplace`` family: issue 4's targets on every parameter.
- Radon (85 ragged clients, fixed effects in the likelihood): federated == pooled Pyro
  SVI with the same ``AutoNormal`` family, every mean within 0.1 pooled sd, every sd
  within 10%.
- Sleepstudy: correlated random effects with an LKJ prior run in gradient mode, and the
  fixed effects land within 2 standard errors of lme4's estimates.

Every fit uses the model file's own first-order settings (``fit_options``, or
``guide_options["mean-field"]`` where the file's default is the second-order server,
whose fits are in ``benchmarks/tuning_free.py`` and ``tests/test_second_order.py``).
"""

import json
import statistics
import time

import pytest
import radon
import seeds
import sleepstudy
import surgical
import torch

from hbfl_pyro import FederatedData, FederatedSVI
from hbfl_pyro.guides import private_params
from hbfl_pyro.modelfile import fit_settings, load_model_file
from hbfl_pyro.pooled import fit_pooled_svi, joint_guide_of

NUM_DRAWS = 20000  # Monte Carlo error of a VI mean: sd_VI / sqrt(20000) < 0.01 sd_ref
ALPHAS = ("alpha0", "alpha1", "alpha2", "alpha12")
SEEDS_GLOBALS = ALPHAS + ("sigma",)


def _fit(module, variant="model", **overrides):
    """The model file's mean-field fit (seed 0): its ``fit_options``, or where the file has
    none (its default is the second-order server) its ``guide_options["mean-field"]``;
    returns the fit and its seconds."""
    settings = getattr(module, "fit_options", None) or module.guide_options["mean-field"]
    options, rounds = fit_settings(settings)
    options.update(overrides)
    fit = FederatedSVI(getattr(module, variant), module.load_data(), seed=0, **options)
    start = time.perf_counter()
    fit.run(rounds, progress=False)
    return fit, time.perf_counter() - start


# ---------------------------------------------------------------------------- structure
STRUCTURE = {
    # (module, variant): (global, local, observed, deterministic, globals in the likelihood)
    ("radon", "model"): (
        ("g0", "g1", "beta", "sigma_a", "sigma_y"),
        ("alpha",),
        ("y",),
        (),
        ("beta", "sigma_y"),
    ),
    ("surgical", "centered"): (("mu", "sigmasq"), ("b",), ("r",), (), ()),
    ("surgical", "noncentered"): (("mu", "sigmasq"), ("b_raw",), ("r",), ("b",), ("mu", "sigmasq")),
    ("seeds", "centered"): (SEEDS_GLOBALS, ("b",), ("n",), (), ALPHAS),
    ("seeds", "noncentered"): (SEEDS_GLOBALS, ("b_raw",), ("n",), ("b",), SEEDS_GLOBALS),
    ("sleepstudy", "model"): (("beta", "tau", "L", "sigma"), ("b",), ("y",), (), ("sigma",)),
}
MODULES = {"radon": radon, "surgical": surgical, "seeds": seeds, "sleepstudy": sleepstudy}
NUM_CLIENTS = {"radon": 85, "surgical": 12, "seeds": 21, "sleepstudy": 18}


@pytest.mark.parametrize("name, variant", list(STRUCTURE))
def test_zoo_structure(name, variant):
    module = MODULES[name]
    fit = FederatedSVI(getattr(module, variant), module.load_data(), seed=0)
    s = fit.structure
    global_sites, local_sites, observed, deterministic, in_likelihood = STRUCTURE[name, variant]
    assert len(fit.clients) == NUM_CLIENTS[name]
    assert s.global_sites == global_sites
    assert s.local_sites == local_sites
    assert s.observed_sites == observed
    assert s.deterministic_sites == deterministic
    # Found structurally on every client: surgical's mu behind a huge prior-draw sigma and
    # seeds' alpha1/alpha2/alpha12, which the first plate's zero covariates switch off.
    assert set(s.likelihood_globals) == set(in_likelihood)
    # No conjugate family fits any of them (unknown local scales, LKJ, Binomial, or
    # fixed effects in the likelihood), and their globals and locals are continuous: with
    # defaults every zoo model runs the second-order server.
    assert fit.server.mode == "second_order"


def test_radon_clients_are_counties():
    clients = radon.load_data()
    assert sum(len(c["log_radon"]) for c in clients.values()) == 919
    assert {"AITKIN", "HENNEPIN", "WRIGHT"} <= set(clients)
    assert len(clients["HENNEPIN"]["floor"]) == 105
    assert clients["AITKIN"]["log_uranium"].dim() == 0


# ---------------------------------------------------------------------------- references
# Asserted |z| bounds per variant and site. What the mean-field family itself reaches here,
# measured with 3000-step pooled-SVI fits (the federated fits land within 0.1 of these):
#   surgical noncentered: mu +0.10, sigmasq -0.43, b up to 0.25
#   surgical centered:    mu -0.02, sigmasq +0.00, b up to 0.19
#   seeds noncentered:    alphas up to 0.19, sigma -0.59, b up to 0.31
#   seeds centered:       alphas up to 0.12, sigma -0.29, b up to 0.19
# The target, 0.3, is asserted wherever the family reaches it; where it cannot
# (mean-field understates sigma, a property of the family, not of federation), the bound
# is the family's own value plus ~0.1 for Monte Carlo noise.
BOUNDS = {
    ("surgical", "noncentered"): {"mu": 0.3, "sigmasq": 0.55, "sigma": 0.55, "b": 0.3},
    ("surgical", "centered"): {"mu": 0.3, "sigmasq": 0.3, "sigma": 0.3, "b": 0.3},
    ("seeds", "noncentered"): dict.fromkeys(ALPHAS, 0.3) | {"sigma": 0.7, "b": 0.4},
    ("seeds", "centered"): dict.fromkeys(ALPHAS, 0.3) | {"sigma": 0.45, "b": 0.3},
}
REFERENCE_FILES = {"surgical": "surgical_selfgen.json", "seeds": "seeds_stanified_selfgen.json"}


def _surgical_draws(fit):
    """Draws of every summarised quantity: (globals, locals), each ``{name: draws}``."""
    g, q = fit.global_samples(NUM_DRAWS), fit.local_samples(NUM_DRAWS)
    sigma = g["sigmasq"].sqrt()
    # Non-centred: b = mu + sigma * b_raw, from the factorised q (as the model computes it).
    b = q["b"] if "b" in q else g["mu"][:, None] + sigma[:, None] * q["b_raw"]
    glob = {"mu": g["mu"], "sigmasq": g["sigmasq"], "sigma": sigma, "pop_mean": g["mu"].sigmoid()}
    return glob, {"b": b, "p": b.sigmoid()}


def _seeds_draws(fit):
    g, q = fit.global_samples(NUM_DRAWS), fit.local_samples(NUM_DRAWS)
    b = q["b"] if "b" in q else g["sigma"][:, None] * q["b_raw"]
    return {k: g[k] for k in SEEDS_GLOBALS}, {"b": b}


DRAWS = {"surgical": _surgical_draws, "seeds": _seeds_draws}


def _z_table(draws, summary):
    """``{(site, index): (mean_VI, mean_ref, z, sd ratio)}`` for every scalar in ``draws``."""
    table = {}
    for site, values in draws.items():
        values = values.reshape(values.shape[0], -1)
        means = torch.as_tensor(summary[site]["mean"], dtype=values.dtype).reshape(-1)
        sds = torch.as_tensor(summary[site]["sd"], dtype=values.dtype).reshape(-1)
        for i in range(values.shape[1]):
            mean, sd = values[:, i].mean().item(), values[:, i].std().item()
            mean_ref, sd_ref = means[i].item(), sds[i].item()
            index = i if values.shape[1] > 1 else None
            table[site, index] = (mean, mean_ref, (mean - mean_ref) / sd_ref, sd / sd_ref)
    return table


def _label(site, index):
    return site if index is None else f"{site}[{index + 1}]"


@pytest.mark.slow
@pytest.mark.parametrize("name, variant", list(BOUNDS))
def test_zoo_against_reference(name, variant, shared_data, report):
    summary = json.loads(
        (shared_data / "reference_posteriors" / REFERENCE_FILES[name]).read_text()
    )["reference_summary"]
    module = MODULES[name]
    fit, seconds = _fit(module, variant)
    assert fit.server.mode == "gradient"
    torch.manual_seed(0)
    glob, loc = DRAWS[name](fit)
    tables = {"global": _z_table(glob, summary), "local": _z_table(loc, summary)}
    tag = f"{name} {variant:11s}"
    for kind, table in tables.items():
        for (site, index), (mean, mean_ref, z, ratio) in table.items():
            report(
                f"{tag} {kind:6s} {_label(site, index):11s} mean {mean:8.4f} (ref {mean_ref:8.4f})"
                f"  z = {z:+.3f}  sd ratio = {ratio:.3f}"
            )
    for kind, table in tables.items():
        zs = [abs(v[2]) for v in table.values()]
        ratios = [v[3] for v in table.values()]
        report(
            f"{tag} {kind} parameters: max |z| = {max(zs):.3f}, median |z| = "
            f"{statistics.median(zs):.3f}; sd ratio {min(ratios):.3f} to {max(ratios):.3f}"
        )
    report(f"{tag} fit: {fit.round} rounds, {seconds:.1f} s")
    bounds = BOUNDS[name, variant]
    for table in tables.values():
        for (site, index), (_, _, z, _) in table.items():
            if site in bounds:
                assert abs(z) <= bounds[site], f"{_label(site, index)}: z = {z:+.3f}"


@pytest.mark.slow
def test_surgical_laplace_family_meets_the_fidelity_targets(shared_data, report):
    """The best family offered for surgical, ``laplace`` (``LaplaceLocalNormal``: each
    hospital's conditional by Newton's method), with the model file's settings for it
    (``guide_options["laplace"]``): every mean within 0.25 reference sd and every sd ratio
    in [0.8, 1.2] (issue 4's targets). Measured at seeds 0, 1, 2: max |z| 0.06-0.08, sd
    ratios 0.84-1.01 (the globals 0.84-0.87; ``sigmasq`` is 0.73 with ``structured``), so
    the bounds leave >= 0.04 for the fit's and the draws' Monte Carlo noise (a VI sd from
    20,000 draws: under 1% relative error). Seed 0 here."""
    summary = json.loads(
        (shared_data / "reference_posteriors" / REFERENCE_FILES["surgical"]).read_text()
    )["reference_summary"]
    spec = load_model_file(f"{surgical.__file__}:centered", guide="laplace")
    fit = FederatedSVI(surgical.centered, surgical.load_data(), seed=0, **spec.options)
    start = time.perf_counter()
    fit.run(spec.rounds, progress=False)
    seconds = time.perf_counter() - start
    torch.manual_seed(0)
    glob, loc = _surgical_draws(fit)
    rows = {**_z_table(glob, summary), **_z_table(loc, summary)}
    for (site, index), (mean, mean_ref, z, ratio) in rows.items():
        report(
            f"surgical laplace {_label(site, index):11s} mean {mean:8.4f} (ref {mean_ref:8.4f})"
            f"  z = {z:+.3f}  sd ratio = {ratio:.3f}"
        )
    report(f"surgical laplace fit: {fit.round} rounds, {seconds:.1f} s")
    for (site, index), (_, _, z, ratio) in rows.items():
        assert abs(z) <= 0.25, f"{_label(site, index)}: z = {z:+.3f}"
        assert 0.8 <= ratio <= 1.2, f"{_label(site, index)}: sd ratio = {ratio:.3f}"


# ---------------------------------------------------------------------------- radon
RADON_GLOBALS = ("g0", "g1", "beta", "sigma_a", "sigma_y")
RADON_POOLED_STEPS = 3000  # 2000 steps leave sigma_a 0.15 sd short of a 10,000-step fit
MEAN_TOL_SD = 0.1
SD_TOL = 0.1


def _loc_scale(guide, sites):
    with private_params():
        return {
            s: tuple(t.detach().reshape(-1) for t in guide._get_loc_and_scale(s)) for s in sites
        }


@pytest.mark.slow
def test_radon_federated_equals_pooled(report):
    """Same model, same mean-field family (AutoNormal), fitted federated and pooled.

    Compared on the variational parameters (location and scale of each site's Normal in
    unconstrained space), in units of the pooled fit's scale. Both fits are stochastic, and
    the pooled one sets the noise floor: two 10,000-step pooled fits (seeds 1, 2) differ by
    up to 0.089 sd in the means and 2.4% in the sds (the worst of the 85 county intercepts),
    and each of them, the 3,000-step pooled fit and the federated fit all lie within 0.09 sd
    and 3% of one another. So 0.1 sd and 10% hold, with little room to tighten the means.
    """
    data = FederatedData(radon.load_data())
    fit, seconds = _fit(radon)
    start = time.perf_counter()
    pooled, _ = fit_pooled_svi(
        radon.model, data, steps=RADON_POOLED_STEPS, lr=0.05, lr_decay=0.01, num_particles=16
    )
    pooled_seconds = time.perf_counter() - start
    joint = joint_guide_of(fit)
    fed = _loc_scale(joint.global_guide, RADON_GLOBALS)
    fed.update(_loc_scale(joint.local, ["alpha"]))
    ref = _loc_scale(pooled, RADON_GLOBALS + ("alpha",))
    worst_z, worst_r = 0.0, 0.0
    for site in ref:
        z = ((fed[site][0] - ref[site][0]) / ref[site][1]).abs().max().item()
        r = (fed[site][1] / ref[site][1] - 1).abs().max().item()
        report(f"radon fed vs pooled: {site:8s} max |z| = {z:.3f}   max |sd ratio - 1| = {r:.3f}")
        worst_z, worst_r = max(worst_z, z), max(worst_r, r)
    report(
        f"radon: federated {fit.round} rounds {seconds:.1f} s, pooled {RADON_POOLED_STEPS} "
        f"steps {pooled_seconds:.1f} s"
    )
    assert worst_z <= MEAN_TOL_SD
    assert worst_r <= SD_TOL


# ---------------------------------------------------------------------------- sleepstudy
# lme4: lmer(Reaction ~ Days + (Days | Subject), sleepstudy), REML: fixed effects
# (estimate, standard error) in ms and ms/day; random-effect sds 24.74 and 5.92 (corr 0.07),
# residual sd 25.59 ms. The reported random-effect summaries are posterior means, not REML
# estimates: Pyro NUTS on this model and prior (1000 draws) gives sds 30.6 and 6.04, corr
# -0.09, residual 25.9, and fixed effects 251.2 (sd 8.3) and 10.44 (sd 1.58).
LME4 = {"intercept": (251.405, 6.825), "slope": (10.467, 1.546)}


# NumPyro NUTS on the pooled data, the model's exact twin (4 chains x (1000 + 5000),
# target acceptance 0.9, seed 0; R-hat 1.00, bulk ESS >= 14,859; 2026-12-05): posterior
# (mean, sd) in the model's scaled units. Monte Carlo error of these means <= 0.01 sd.
SLEEPSTUDY_NUTS = {
    "beta": ((-0.031, 0.940), (0.187, 0.146)),
    "tau": ((0.773, 0.553), (0.139, 0.118)),
    "sigma": ((0.516,), (0.030,)),
}


@pytest.mark.slow
def test_sleepstudy_defaults_against_nuts(report):
    """``hbfl fit models/sleepstudy.py`` with no options (the second-order server): every
    global mean within 0.25 NUTS sd and every sd ratio in [0.8, 1.2] (issue 13's fidelity
    targets; measured: 0.094 and 0.96-1.04 with 4000 draws, so the PSIS-resampled draws'
    Monte Carlo error, about 0.03 sd, leaves a wide margin)."""
    assert not hasattr(sleepstudy, "fit_options")  # defaults, nothing tuned
    fit = FederatedSVI(sleepstudy.model, sleepstudy.load_data(), seed=0)
    fit.run(progress=False)
    assert fit.server.mode == "second_order" and fit.verdict["status"] == "converged"
    assert fit.verdict["reliable"]
    g = fit.global_samples(4000)
    for site, (means, sds) in SLEEPSTUDY_NUTS.items():
        draws = g[site].reshape(4000, -1)
        z = (draws.mean(0) - torch.tensor(means)).abs() / torch.tensor(sds)
        ratio = draws.std(0) / torch.tensor(sds)
        report(
            f"sleepstudy defaults {site}: max |z| {z.max():.3f}, sd ratio {ratio.min():.2f}-"
            f"{ratio.max():.2f}; {fit.verdict['rounds']} Newton rounds"
        )
        assert z.max() <= 0.25 and 0.8 <= ratio.min() and ratio.max() <= 1.2, site


@pytest.mark.slow
def test_sleepstudy_lkj_gradient_mode_against_lme4(report):
    """A non-conjugate prior (LKJ) on a global site: gradient mode, lme4's fixed effects.

    The posterior means of the intercept and slope, mapped back to ms and ms/day, must lie
    within 2 lme4 standard errors of lme4's estimates (measured: within 0.03).
    """
    fit, seconds = _fit(sleepstudy)
    assert fit.server.mode == "gradient"
    assert "L" in fit.structure.global_sites
    torch.manual_seed(0)
    g = fit.global_samples(NUM_DRAWS)
    L = g["L"]
    # Draws of q(L) are Cholesky factors of correlation matrices (the LKJ support).
    assert torch.all(L.triu(1) == 0)
    torch.testing.assert_close(L.pow(2).sum(-1), torch.ones(NUM_DRAWS, 2))
    intercept, slope = sleepstudy.to_original_units(g["beta"][..., 0], g["beta"][..., 1])
    # The between-subject covariance in the original units: b_orig = A b + const.
    s = sleepstudy
    A = torch.tensor([[1.0, -s.DAYS_CENTER / s.DAYS_SCALE], [0.0, 1.0 / s.DAYS_SCALE]])
    chol = (s.REACTION_SCALE * A) @ (g["tau"].unsqueeze(-1) * L)
    cov = chol @ chol.transpose(-1, -2)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    corr = cov[:, 0, 1] / (sd[:, 0] * sd[:, 1])
    for label, values in (("intercept", intercept), ("slope", slope)):
        est, se = LME4[label]
        z = (values.mean().item() - est) / se
        report(
            f"sleepstudy {label:9s} mean {values.mean().item():7.2f} sd {values.std().item():5.2f}"
            f"  (lme4 {est:.2f} se {se:.2f})  z = {z:+.3f}"
        )
        assert abs(z) <= 2.0, f"{label}: z = {z:+.3f}"
    report(
        f"sleepstudy random effects: sd intercept {sd[:, 0].mean():.2f} (lme4 24.74), sd slope "
        f"{sd[:, 1].mean():.2f} (5.92), corr {corr.mean():.2f} (0.07), residual sd "
        f"{(g['sigma'] * s.REACTION_SCALE).mean():.2f} (25.59); {fit.round} rounds, {seconds:.1f} s"
    )
