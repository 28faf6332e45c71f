"""Tests of the Normal–Inverse-Wishart families and the InverseWishart distribution.

Monte Carlo checks assert agreement within 5 standard errors of the MC mean (the error
is computed from the draws), so with fixed seeds they are deterministic and a correct
implementation fails one comparison with probability below 1e-6 per comparison.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to, constraints

from hbfl_pyro.families.niw import (
    InverseWishart,
    NIWDiag,
    NIWFull,
    NIWIso,
    VechToPositiveDefinite,
)

D = 3
N = 7
LOG_2PI = math.log(2 * math.pi)
FAMILIES = ["full", "diag", "iso"]


@pytest.fixture(autouse=True)
def float64_and_seed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(old)


def random_spd(d, generator, jitter=0.1):
    a = torch.randn(d, d, generator=generator)
    return a @ a.T / d + jitter * torch.eye(d)


def make_family(name):
    mu0 = torch.tensor([0.5, -1.0, 0.2])
    if name == "full":
        sigma0 = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.5, -0.2], [0.0, -0.2, 1.0]])
        return NIWFull(D, mu0=mu0, lambda0=0.7, Sigma0=sigma0, nu0=D + 2.5)
    if name == "diag":
        return NIWDiag(
            D,
            mu0=mu0,
            lambda0=torch.tensor([0.7, 1.3, 2.0]),
            a0=torch.tensor([2.0, 3.0, 1.5]),
            b0=torch.tensor([1.0, 2.0, 0.5]),
        )
    return NIWIso(D, mu0=mu0, lambda0=0.7, a0=2.5, b0=1.5)


def make_clients(seed=1):
    """N client means and covariances: diagonal ``(d,)`` for even i, full for odd i."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(N, D, generator=g) + 1.0
    covs = [0.1 + torch.rand(D, generator=g) if i % 2 == 0 else random_spd(D, g) for i in range(N)]
    return means, covs


def summed(family, means, covs):
    parts = [family.client_summary(m, v) for m, v in zip(means, covs)]
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def posterior_params(name):
    family = make_family(name)
    means, covs = make_clients()
    return family, family.server_update(summed(family, means, covs), N)


def as_matrix(cov):
    return torch.diag_embed(cov) if cov.dim() == 1 else cov


# --------------------------------------------------------------------------------------
# Server block written out independently of server_update
# --------------------------------------------------------------------------------------


def expected_client_term(name, params, m, cov):
    """``E_{q_i} E_q[log p(theta_i | phi)]`` for ``q_i = N(m, cov)``, written by hand.

    ``E_q[log p(theta|phi)]`` is ``c - 0.5 (theta - m0)^T A (theta - m0)``, so its mean
    under ``q_i`` is ``c - 0.5 [(m - m0)^T A (m - m0) + tr(A V)]``.
    """
    cov = as_matrix(cov)
    diff = m - params["m0"]
    if name == "full":
        l0, v0, n0 = params["l0"], params["V0"], params["n0"]
        a = n0 * torch.linalg.inv(v0)
        j = torch.arange(1, D + 1)
        e_logdet = torch.logdet(v0) - D * math.log(2) - torch.digamma((n0 - j + 1) / 2).sum()
        quad = diff @ a @ diff + torch.trace(a @ cov)
        return -0.5 * e_logdet - 0.5 * D * LOG_2PI - 0.5 * (D / l0 + quad)
    a, b, l0 = params["a"], params["b"], params["l0"]
    e_log_var = b.log() - torch.digamma(a)
    if name == "diag":
        quad = (a / b) * (diff.pow(2) + cov.diagonal())
        return (-0.5 * e_log_var - 0.5 * LOG_2PI - 0.5 * (1 / l0 + quad)).sum()
    quad = (a / b) * (diff @ diff + torch.trace(cov))
    return -0.5 * D * (e_log_var + LOG_2PI) - 0.5 * (D / l0 + quad)


def server_objective(name, family, params, means, covs):
    terms = [expected_client_term(name, params, m, v) for m, v in zip(means, covs)]
    return family.neg_kl(params) + sum(terms)


def to_unconstrained(name, params):
    if name == "full":
        rows, cols = torch.tril_indices(D, D)
        vech = torch.linalg.cholesky(params["V0"])[rows, cols]
        parts = [
            params["m0"],
            params["l0"].log().reshape(1),
            torch.where(rows == cols, vech.log(), vech),
            (params["n0"] - (D - 1)).log().reshape(1),
        ]
    else:
        parts = [params["m0"]] + [params[k].log().reshape(-1) for k in ("l0", "a", "b")]
    return torch.cat(parts)


def from_unconstrained(name, u):
    m0, rest = u[:D], u[D:]
    if name == "full":
        rows, cols = torch.tril_indices(D, D)
        k = D * (D + 1) // 2
        vech = rest[1 : 1 + k]
        vech = torch.where(rows == cols, vech.exp(), vech)
        tril = torch.zeros(D, D).index_put((rows, cols), vech)
        return {
            "m0": m0,
            "l0": rest[0].exp(),
            "V0": tril @ tril.T,
            "n0": (D - 1) + rest[1 + k].exp(),
        }
    size = D if name == "diag" else 1
    l0, a, b = rest.exp().reshape(3, size)
    if name == "iso":
        l0, a, b = l0[0], a[0], b[0]
    return {"m0": m0, "l0": l0, "a": a, "b": b}


@pytest.mark.parametrize("name", FAMILIES)
def test_server_update_maximises_server_block(name):
    family = make_family(name)
    means, covs = make_clients()
    closed = family.server_update(summed(family, means, covs), N)

    # The hand-written client term agrees with the family's expected_log_prior at
    # V_i = 0, so the objective below is the one clients actually see.
    params0 = from_unconstrained(name, torch.randn(to_unconstrained(name, closed).shape))
    torch.testing.assert_close(
        expected_client_term(name, params0, means[0], torch.zeros(D)),
        family.expected_log_prior(means[0], params0),
    )

    def objective(u):
        return server_objective(name, family, from_unconstrained(name, u), means, covs)

    # Start at the prior's parameters, well away from the optimum.
    u = to_unconstrained(name, family.init_params()).clone().requires_grad_()

    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -objective(u)
        loss.backward()
        return loss

    opt.step(closure)
    # Strong-Wolfe L-BFGS stalls near |grad| ~ 1e-8: its line search needs a measurable
    # decrease of F, and there the decrease (~|grad|^2) is below the double-precision
    # round-off of F (~1e-14 for |F| ~ 70). Newton steps use derivatives only and
    # converge quadratically from there (the gradient's own round-off is ~1e-14).
    u = u.detach()
    for _ in range(20):
        (grad,) = torch.autograd.grad(objective(u.requires_grad_()), u)
        u = u.detach()
        if grad.abs().max() < 1e-10:
            break
        hessian = torch.autograd.functional.hessian(objective, u, vectorize=True)
        u = u - torch.linalg.solve(hessian, grad)
    assert grad.abs().max() < 1e-10

    numeric = from_unconstrained(name, u.detach())
    # F is smooth and strictly concave near its unique maximum (F = const - KL(q||q*)),
    # so a gradient of 1e-10 leaves parameter errors far below rtol 1e-5.
    for key in closed:
        torch.testing.assert_close(numeric[key], closed[key], rtol=1e-5, atol=1e-8)
    f_closed = objective(to_unconstrained(name, closed))
    f_numeric = objective(u)
    assert f_closed >= f_numeric - 1e-8


# --------------------------------------------------------------------------------------
# Closed forms against Monte Carlo
# --------------------------------------------------------------------------------------


def assert_within_se(samples, expected, num_se=5.0):
    """Assert ``samples.mean(0) == expected`` within ``num_se`` MC standard errors."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all(se > 0)
    err = (mean - expected).abs()
    assert torch.all(err < num_se * se), (mean, expected, se)


def model_local_log_prob(family, phi, theta):
    """``log p(theta | phi)`` from the family's own Pyro model statement."""
    cond = poutine.condition(family.sample_local, data={family.local_site: theta})
    node = poutine.trace(cond).get_trace(phi).nodes[family.local_site]
    return node["fn"].log_prob(node["value"])


def model_global_log_prob(family, phi):
    """``log p(phi)`` from the family's own Pyro model statements."""
    trace = poutine.trace(poutine.condition(family.sample_global, data=phi)).get_trace()
    return sum(trace.nodes[s]["fn"].log_prob(trace.nodes[s]["value"]) for s in family.global_sites)


def posterior_log_prob(name, family, params, phi):
    """``log q(phi)`` built directly from the distributions."""
    mu_site, var_site = family.global_sites
    mu, var = phi[mu_site], phi[var_site]
    if name == "full":
        log_q = InverseWishart(params["n0"], params["V0"]).log_prob(var)
        return log_q + dist.MultivariateNormal(params["m0"], var / params["l0"]).log_prob(mu)
    log_q_var = dist.InverseGamma(params["a"], params["b"]).log_prob(var)
    if name == "iso":
        scale = (var / params["l0"]).sqrt().unsqueeze(-1)
        return log_q_var + dist.Normal(params["m0"], scale).log_prob(mu).sum(-1)
    scale = (var / params["l0"]).sqrt()
    return log_q_var.sum(-1) + dist.Normal(params["m0"], scale).log_prob(mu).sum(-1)


@pytest.mark.parametrize("name", FAMILIES)
def test_expected_log_prior_matches_monte_carlo(name):
    family, params = posterior_params(name)
    phi = family.sample_posterior(params, 200_000)
    for theta in [params["m0"], params["m0"] + torch.tensor([1.0, -2.0, 0.5])]:
        samples = model_local_log_prob(family, phi, theta)
        assert samples.shape == (200_000,)
        assert_within_se(samples, family.expected_log_prior(theta, params))


@pytest.mark.parametrize("name", FAMILIES)
def test_neg_kl_matches_monte_carlo(name):
    family, params = posterior_params(name)
    phi = family.sample_posterior(params, 200_000)
    samples = model_global_log_prob(family, phi) - posterior_log_prob(name, family, params, phi)
    assert_within_se(samples, family.neg_kl(params))
    # q = p gives KL = 0 exactly.
    torch.testing.assert_close(family.neg_kl(family.init_params()), torch.tensor(0.0))


@pytest.mark.parametrize("name", FAMILIES)
def test_log_posterior_is_q_and_at_the_prior_the_models_prior(name):
    # log q(phi), which the PSIS check of a closed-form fit weighs against: q's density at
    # its draws, and at the prior's parameters the model's own prior density (Pyro's).
    family, params = posterior_params(name)
    phi = family.sample_posterior(params, 50)
    torch.testing.assert_close(
        family.log_posterior(params, phi), posterior_log_prob(name, family, params, phi)
    )
    prior = family.init_params()
    at_prior = family.sample_posterior(prior, 50)
    torch.testing.assert_close(
        family.log_posterior(prior, at_prior), model_global_log_prob(family, at_prior)
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_point_values_are_posterior_means(name):
    family, params = posterior_params(name)
    draws = family.sample_posterior(params, 200_000)
    points = family.point_values(params)
    assert set(points) == set(draws) == set(family.global_sites)
    for site in family.global_sites:
        assert draws[site].shape[1:] == points[site].shape
        assert_within_se(draws[site], points[site])


def test_expected_log_prior_batches():
    for name in FAMILIES:
        family, params = posterior_params(name)
        theta = torch.randn(4, 2, D)
        out = family.expected_log_prior(theta, params)
        assert out.shape == (4, 2)
        torch.testing.assert_close(out[1, 0], family.expected_log_prior(theta[1, 0], params))


@pytest.mark.parametrize("name", FAMILIES)
def test_weighted_summary_sums_equal_the_sum_of_client_summaries(name):
    """The fast per-family sums (iso: one norm per row; diag: one squared temporary) equal
    the definition, sum_i w_i client_summary(m_i, V_i), for per-client and shared (scalar)
    diagonal variances. Float64 round-off only (1e-12 relative)."""
    family = make_family(name)
    g = torch.Generator().manual_seed(3)
    means = torch.randn(5, D, generator=g)
    weights = torch.rand(5, generator=g) * 3
    for var in (torch.rand(5, D, generator=g), torch.tensor(0.04)):
        full = var.expand_as(means)
        rows = [family.client_summary(m, v) for m, v in zip(means, full)]
        expected = {k: sum(w * r[k] for w, r in zip(weights, rows)) for k in rows[0]}
        got = family.weighted_summary_sums(weights, means, var)
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)


def test_families_agree_at_d1():
    # For d = 1, IW(nu, psi) = InvGamma(nu / 2, psi / 2): all three families coincide.
    a0, b0, mu0, lambda0 = 2.5, 1.5, 0.3, 0.8
    full = NIWFull(1, mu0=mu0, lambda0=lambda0, Sigma0=2 * b0, nu0=2 * a0)
    diag = NIWDiag(1, mu0=mu0, lambda0=lambda0, a0=a0, b0=b0)
    iso = NIWIso(1, mu0=mu0, lambda0=lambda0, a0=a0, b0=b0)
    means, covs = torch.randn(N, 1), [0.1 + torch.rand(1) for _ in range(N)]
    pf = full.server_update(summed(full, means, covs), N)
    theta = torch.tensor([[0.7], [-1.2]])
    for fam in (diag, iso):
        p = fam.server_update(summed(fam, means, covs), N)
        torch.testing.assert_close(p["m0"], pf["m0"])
        torch.testing.assert_close(2 * p["a"].reshape(()), pf["n0"])
        torch.testing.assert_close(2 * p["b"].reshape(()), pf["V0"].reshape(()))
        torch.testing.assert_close(fam.neg_kl(p), full.neg_kl(pf))
        torch.testing.assert_close(
            fam.expected_log_prior(theta, p), full.expected_log_prior(theta, pf)
        )


# --------------------------------------------------------------------------------------
# InverseWishart
# --------------------------------------------------------------------------------------


def test_inverse_wishart_d1_is_inverse_gamma():
    x = torch.tensor([0.1, 0.7, 2.0, 9.0])
    for df, psi in [(0.5, 1.0), (3.0, 0.2), (11.0, 4.0)]:
        iw = InverseWishart(torch.tensor(df), torch.tensor([[psi]]))
        expected = dist.InverseGamma(df / 2, psi / 2).log_prob(x)
        torch.testing.assert_close(iw.log_prob(x.reshape(-1, 1, 1)), expected)


# torch's Wishart warns about df < d (singular *samples*); only its log_prob is used.
@pytest.mark.filterwarnings("ignore:Low df values detected")
def test_inverse_wishart_log_prob_matches_torch_wishart():
    # X ~ IW(nu, Psi)  <=>  X^{-1} ~ Wishart(nu, Psi^{-1}); |dX^{-1}/dX| = |X|^{-(d+1)}.
    g = torch.Generator().manual_seed(3)
    psi = random_spd(D, g)
    x = torch.stack([random_spd(D, g) for _ in range(5)])
    for df in [2.5, 7.0]:
        iw = InverseWishart(torch.tensor(df), psi)
        wishart = torch.distributions.Wishart(torch.tensor(df), precision_matrix=psi)
        expected = wishart.log_prob(torch.linalg.inv(x)) - (D + 1) * torch.logdet(x)
        torch.testing.assert_close(iw.log_prob(x), expected)


def test_inverse_wishart_sample_mean():
    g = torch.Generator().manual_seed(4)
    psi = random_spd(D, g)
    iw = InverseWishart(torch.tensor(9.0), psi)  # df > d + 3: finite variance
    samples = iw.sample((20_000,))
    assert samples.shape == (20_000, D, D)
    assert iw.support.check(samples).all()
    torch.testing.assert_close(iw.mean, psi / (9.0 - D - 1))
    assert_within_se(samples, iw.mean)


def test_inverse_wishart_shapes_and_expand():
    psi = torch.eye(D) + 0.1
    iw = InverseWishart(torch.tensor([4.0, 6.0]), psi)
    assert iw.batch_shape == (2,) and iw.event_shape == (D, D)
    big = iw.expand((5, 2))
    x = big.rsample((4,))
    assert x.shape == (4, 5, 2, D, D)
    assert big.log_prob(x).shape == (4, 5, 2)
    torch.testing.assert_close(big.log_prob(x)[:, :, 1], iw.log_prob(x)[:, :, 1])
    with pytest.raises(ValueError):
        InverseWishart(torch.tensor(1.5), psi, validate_args=True)
    # The support is positive_definite, with a bijection for NUTS and autoguides.
    assert isinstance(iw.support, type(constraints.positive_definite))
    transform = biject_to(iw.support)
    torch.testing.assert_close(transform(transform.inv(x)), x)


def test_inverse_wishart_rsample_has_gradients():
    df = torch.tensor(6.0, requires_grad=True)
    psi = (torch.eye(D) * 2.0).requires_grad_()
    InverseWishart(df, psi).rsample((10,)).sum().backward()
    assert torch.isfinite(df.grad) and torch.isfinite(psi.grad).all()


def test_vech_bijection():
    t = VechToPositiveDefinite()
    x = torch.randn(2, D * (D + 1) // 2)
    y = t(x)
    assert y.shape == (2, D, D) and t.forward_shape(x.shape) == y.shape
    assert t.inverse_shape(y.shape) == x.shape
    torch.testing.assert_close(t.inv(y), x)
    # log|J| with respect to the d(d+1)/2 distinct entries (the lower triangle).
    rows, cols = torch.tril_indices(D, D)
    jac = torch.autograd.functional.jacobian(lambda v: t(v)[rows, cols], x[0])
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y)[0], torch.linalg.slogdet(jac)[1])


# --------------------------------------------------------------------------------------
# Pyro model helpers
# --------------------------------------------------------------------------------------


def make_model(family, data):
    def model():
        phi = family.sample_global()
        with pyro.plate("clients", data.shape[0]):
            theta = family.sample_local(phi)
            pyro.sample("obs", dist.Normal(theta, 1.0).to_event(1), obs=data)

    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_model_helpers_trace(name):
    family = make_family(name)
    clients = 5
    model = make_model(family, torch.randn(clients, D))
    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    mu_site, var_site = family.global_sites
    var_shape = {"full": (D, D), "diag": (D,), "iso": ()}[name]
    expected = {
        mu_site: ((D,), ()),
        var_site: (var_shape, ()),
        family.local_site: ((clients, D), (clients,)),
        "obs": ((clients, D), (clients,)),
    }
    for site, (value_shape, log_prob_shape) in expected.items():
        node = trace.nodes[site]
        assert node["value"].shape == value_shape, site
        assert node["log_prob"].shape == log_prob_shape, site
        assert torch.isfinite(node["log_prob"]).all()
    assert [f.name for f in trace.nodes[family.local_site]["cond_indep_stack"]] == ["clients"]


@pytest.mark.parametrize("name", FAMILIES)
def test_model_helpers_run_under_svi_and_nuts(name):
    family = make_family(name)
    model = make_model(family, torch.randn(4, D))
    # Vectorised particles add a batch dim left of the plate: checks broadcasting.
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    # A bounded NUTS run: needs a bijection for every support, including Sigma's.
    kernel = NUTS(model, max_tree_depth=3)
    mcmc = MCMC(kernel, warmup_steps=5, num_samples=5, disable_progbar=True)
    mcmc.run()
    samples = mcmc.get_samples()
    assert samples[family.local_site].shape == (5, 4, D)
    assert all(torch.isfinite(v).all() for v in samples.values())
