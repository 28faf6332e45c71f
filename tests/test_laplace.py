"""The conditional Laplace local factor (:class:`~hbfl_pyro.LaplaceLocalNormal`).

Checked against independent formulas: where a client's conditional ``p(theta_i | phi, D_i)``
is Gaussian (a Normal likelihood with a Normal prior, scalar or, as in sleepstudy, a
bivariate random effect with a masked design) its mean and precision are known in closed
form and the factor must reproduce them for every draw of ``phi``; for a positive local site
the mode must zero a hand-written gradient of the conditional log joint in ``log theta``,
the precision equal its negated second derivative, and ``log q(theta)`` carry the
Jacobian ``- log theta``.
"""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import sleepstudy
import surgical
import torch
from conditional_guides import factor_for, positive_local
from pyro import poutine
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_feasible

from hbfl_pyro import FederatedSVI, LaplaceLocalNormal, personalise
from hbfl_pyro.guides import guide_family, private_params
from hbfl_pyro.seeding import seeded

# (float64 per test: tests/conftest.py)
SIGMA_Y = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)


def normal_normal(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("clients", data["y"].shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, data["s"]), obs=data["y"])


def _guide(model, clients):
    return factor_for(LaplaceLocalNormal, model, clients)


def _trace(guide, batch, globals_):
    with private_params():
        trace = poutine.trace(guide).get_trace(batch, globals=globals_)
    trace.compute_log_prob()
    return trace


def test_gaussian_conditional_is_exact_for_every_draw():
    clients = {f"c{i}": {"y": torch.tensor(2.0 * i - 3.0), "s": SIGMA_Y[i]} for i in range(4)}
    guide, batch = _guide(normal_normal, clients)
    # Five draws of phi in the particle layout the ELBO uses: (draws, 1) per scalar global.
    mu = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0]).unsqueeze(-1)
    tau = torch.tensor([0.3, 1.0, 2.0, 5.0, 0.7]).unsqueeze(-1)
    mode, precision = guide.conditional(batch, {"mu": mu, "tau": tau})
    y, s = batch["y"], batch["s"]
    exact_precision = 1 / s**2 + 1 / tau**2
    exact_mean = (y / s**2 + mu / tau**2) / exact_precision
    # Newton is exact in one step on a quadratic; four are taken: round-off only.
    assert torch.allclose(mode.squeeze(-1), exact_mean, atol=1e-10)
    assert torch.allclose(precision[..., 0, 0], exact_precision, rtol=1e-10)


def test_bivariate_conditional_is_exact_with_masked_days():
    """Sleepstudy's random intercept and slope: clients plate at dim -2, an MVN local site
    and a Cholesky-factor global. The conditional precision is ``Sigma^-1 + X'X / sigma^2``
    over the client's observed days only."""
    clients = dict(list(sleepstudy.load_data().items())[:3])
    first = next(iter(clients))
    clients[first] = {k: v[:6] for k, v in clients[first].items()}  # a ragged client
    guide, batch = _guide(sleepstudy.model, clients)
    beta = torch.tensor([[0.1, -0.2], [0.3, 0.4]]).reshape(2, 1, 1, 2)
    tau = torch.tensor([[0.5, 0.3], [1.0, 0.2]]).reshape(2, 1, 1, 2)
    L = dist.LKJCholesky(2, 2.0).sample((2, 1, 1))
    sigma = torch.tensor([0.3, 0.6]).reshape(2, 1, 1)
    globals_ = {"beta": beta, "tau": tau, "L": L, "sigma": sigma}
    mode, got_precision = guide.conditional(batch, globals_)
    scale_tril = tau.unsqueeze(-1) * L
    prior_precision = torch.cholesky_inverse(scale_tril)  # (2, 1, 1, 2, 2)
    x, y, mask = batch["days"], batch["reaction"], batch["mask"].to(batch["days"].dtype)
    design = torch.stack([torch.ones_like(x), x], -1) * mask.unsqueeze(-1)  # (3, 10, 2)
    xtx = design.transpose(-1, -2) @ design  # (3, 2, 2)
    precision = prior_precision.squeeze(1) + xtx / sigma.unsqueeze(-1) ** 2
    rhs = (prior_precision.squeeze(1) @ beta.squeeze(1).unsqueeze(-1)).squeeze(-1) + (
        design.transpose(-1, -2) @ (y * mask).unsqueeze(-1)
    ).squeeze(-1) / sigma**2
    mean = torch.linalg.solve(precision, rhs)
    assert torch.allclose(got_precision, precision, rtol=1e-9)
    assert torch.allclose(mode, mean, atol=1e-9)


def test_positive_local_site_mode_curvature_and_density():
    clients = {f"c{i}": {"y": torch.tensor(float(i) + 0.5)} for i in range(3)}
    guide, batch = _guide(positive_local, clients)
    guide.newton_steps = 12  # a non-quadratic conditional: converge before comparing
    mu, tau = torch.tensor([[0.4]]), torch.tensor([[0.9]])
    trace = _trace(guide, batch, {"mu": mu, "tau": tau})
    mode, precision = guide.conditional(batch, {"mu": mu, "tau": tau})
    mode = mode.squeeze(-1).detach().requires_grad_(True)

    # log p(scale = e^z, y | mu, tau) + z, written out: LogNormal prior, Normal likelihood.
    def log_joint(z):
        prior = dist.Normal(mu, tau).log_prob(z) - z
        return (prior + dist.Normal(0.0, z.exp()).log_prob(batch["y"]) + z).sum()

    (grad,) = torch.autograd.grad(log_joint(mode), mode, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), mode)
    assert grad.abs().max() < 1e-8  # converged Newton: quadratic convergence, round-off
    assert torch.allclose(precision[..., 0, 0], -second, rtol=1e-6)
    # log q(scale) = log N(z; mode, 1 / sqrt(P)) - log |d scale / d z| = ... - z.
    z = trace.nodes["_laplace_unconstrained"]["value"].squeeze(-1)
    assert torch.allclose(trace.nodes["scale"]["value"], z.exp())
    expected = dist.Normal(mode.detach(), (-second).rsqrt())
    expected = expected.log_prob(z) - z
    got = sum(
        trace.nodes[name]["log_prob"]
        for name in ("_laplace_noise", "_laplace_unconstrained", "scale")
    )
    assert torch.allclose(got, expected, atol=1e-8)


@pytest.mark.slow
def test_vectorised_engine_equals_loop():
    """Newton's method batched over the round's clients gives each client's own modes and
    curvatures, hence the loop's gradients: surgical (Binomial-logit, a non-Gaussian
    conditional), with a point-mass q(phi) and two moment-matched particles, which make
    both engines' objectives deterministic. The factor has no parameters: clients take no
    local steps, and their state is the Newton starting point (compared too)."""

    def fit(engine):
        return FederatedSVI(
            surgical.model,
            dict(list(surgical.load_data().items())[:5]),
            # init_to_feasible: AutoDelta's default init_to_median overflows on surgical's
            # InverseGamma(0.001, 0.001) prior.
            global_guide=partial(AutoDelta, init_loc_fn=init_to_feasible),
            local_guide=LaplaceLocalNormal,
            server="gradient",
            seed=2,
            fraction=0.6,
            num_particles=2,
            grad_particles=2,
            moment_matched=True,
            engine=engine,
        )

    loop, vec = fit("inprocess"), fit("vectorised")
    start = {k: v.clone() for k, v in loop.server.global_guide.state_dict().items()}
    loop.run(3, progress=False)
    vec.run(3, progress=False)
    a, b = loop.state_dict(), vec.state_dict()
    assert [r["clients"] for r in loop.history] == [r["clients"] for r in vec.history]
    for name, state in a["clients"].items():
        assert state["optim"] is None and b["clients"][name]["optim"] is None
        for key, value in state["guide"].items():
            torch.testing.assert_close(
                b["clients"][name]["guide"][key], value, rtol=1e-9, atol=1e-10
            )
    for key, value in a["server"]["global_guide"].items():
        assert not torch.equal(value, start[key])  # the fit moved: not a comparison of inits
        torch.testing.assert_close(b["server"]["global_guide"][key], value, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        torch.tensor([r["elbo"] for r in vec.history]),
        torch.tensor([r["elbo"] for r in loop.history]),
        rtol=1e-9,
        atol=1e-10,
    )


@pytest.mark.slow
def test_new_client_draws_follow_its_exact_conditional():
    """``personalise`` rebuilds the Laplace factor for a new client from its own data, and
    ``Personalised.sample`` pairs each draw of ``q(phi)`` with a draw of
    ``q(theta_new | phi)``; on a Gaussian conditional that is exact, so every draw
    standardised by its own ``phi``'s closed-form conditional is a standard normal."""
    clients = {f"c{i}": {"y": torch.tensor(2.0 * i - 3.0), "s": SIGMA_Y[i]} for i in range(4)}
    fit = FederatedSVI(normal_normal, clients, seed=0, **guide_family("laplace"))
    fit.run(30, progress=False)
    before = {k: v.clone() for k, v in fit.server.global_guide.state_dict().items()}
    new = personalise(fit, {"y": torch.tensor(7.0), "s": torch.tensor(1.0)})
    for key, value in fit.server.global_guide.state_dict().items():
        assert torch.equal(value, before[key])  # the server's state is untouched
    n = 4000
    theta = new.sample(n, seed=3)["theta"]
    with seeded(3):  # the same draws of q(phi) that sample() paired them with
        phi = fit.global_samples(n)
    precision = 1.0 + 1 / phi["tau"] ** 2
    mean = (7.0 + phi["mu"] / phi["tau"] ** 2) / precision
    standard = (theta - mean) * precision.sqrt()
    # Monte Carlo tolerances: 4 standard errors of a mean (1/sqrt(n)) and of an sd
    # (sqrt(1/(2n))) of n = 4,000 standard normals.
    assert abs(float(standard.mean())) < 4 / n**0.5
    assert abs(float(standard.std()) - 1) < 4 * (0.5 / n) ** 0.5
