"""The second-order server (issue 20): exactness, engines, batching, verdicts, state.

Tolerances: the Normal-Normal hierarchy is Gaussian and linear, so the clients' Laplace
marginals are its exact marginals and one Newton step from anywhere lands on the exact
posterior mode; what is left is float64 rounding of sums of a few hundred terms
(1e-8 relative is a wide margin over it). In-process and vectorised engines run the same
per-client function (vectorised by ``torch.func.vmap``), so they agree to rounding too.
"""

import inspect
import json
import math
import re
import warnings

import eight_schools
import normal_normal
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from hbfl_pyro import (
    ConvergenceWarning,
    FederatedData,
    FederatedSVI,
    LaplaceMarginal,
    SecondOrderServer,
    discover_structure,
    num_clients,
)
from hbfl_pyro.servers import trust_region_step


def _fit(model, data, **kwargs):
    fit = FederatedSVI(model, data, seed=0, server="second_order", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit.run(progress=False)
    return fit


@pytest.mark.slow
def test_normal_normal_first_newton_step_is_the_exact_posterior():
    data = normal_normal.load_data()
    mean, cov = normal_normal.exact_posterior(data)
    fit = _fit(normal_normal.model, data)
    first, second = fit.history[0], fit.history[1]
    assert first["accepted"] and second["accepted"]
    # Round 2 evaluated the first step's point: the exact mode, where the decrement is 0.
    assert second["decrement"] < 1e-12
    assert fit.verdict["status"] == "converged" and fit.verdict["rounds"] == 2
    post = fit.server.posterior
    assert post["mean"].item() == pytest.approx(mean[0].item(), rel=1e-8)
    assert post["covariance"].item() == pytest.approx(cov[0, 0].item(), rel=1e-8)
    # Gaussian target, Gaussian proposal: the importance weights are constant.
    assert fit.verdict["k_hat"] < 0.7


def test_trust_region_step_is_newtons_step_inside_the_region():
    gradient = torch.tensor([1.0, -2.0])
    precision = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    newton = torch.linalg.solve(precision, gradient)
    step, predicted, _ = trust_region_step(gradient, precision, math.inf)
    assert torch.allclose(step, newton, rtol=1e-12)
    assert predicted == pytest.approx(0.5 * float(gradient @ newton), rel=1e-12)
    # A small region: the step stays on its boundary and still ascends.
    step, predicted, length = trust_region_step(gradient, precision, 0.1)
    assert length == pytest.approx(0.1, rel=1e-6) and predicted > 0
    # Indefinite curvature: still an ascent step of the region's size.
    step, predicted, length = trust_region_step(gradient, -precision, 0.5)
    assert length == pytest.approx(0.5, rel=1e-6) and predicted > 0


def _glmm(data):
    """A Poisson GLMM with an exposure offset, written as Pyro's docs write models."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 5.0))
    slope = pyro.sample("slope", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        effect = pyro.sample("effect", dist.Normal(0.0, scale))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            rate = torch.exp(intercept + slope * data["x"] + effect + data["log_exposure"])
            pyro.sample("y", dist.Poisson(rate), obs=data["y"])


def _glmm_data(num=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clients = {}
    for i in range(num):
        n = 4 + 3 * i
        x = torch.randn(n, generator=gen)
        log_exposure = torch.rand(n, generator=gen).log1p()
        effect = 0.4 * torch.randn((), generator=gen)
        y = torch.poisson((-1.0 + 0.5 * x + effect + log_exposure).exp(), generator=gen)
        clients[f"c{i}"] = {"x": x, "y": y, "log_exposure": log_exposure}
    return clients


def _pooled_objective(model, data, z, layout):
    """``log p(z) + sum_i L_i(z)`` computed pooled, without the library's client code:
    plain Pyro traces of the collated data, torch.autograd, one Newton solve over every
    client's locals at once (their curvature is block diagonal)."""
    batch = FederatedData(data).collate()
    structure = discover_structure(model, FederatedData(data))
    values = layout.constrain(z)
    num = batch["y"].shape[0]
    t = torch.zeros(num, requires_grad=True)

    def log_joint(t):
        effect = t.reshape(num, 1)
        conditioned = poutine.condition(model, data={**values, "effect": effect})
        with pyro.validation_enabled(False):
            trace = poutine.trace(conditioned).get_trace(batch)
        trace.compute_log_prob()
        return sum(trace.nodes[n]["log_prob"].sum() for n in ("effect", "y"))

    for _ in range(50):
        hess = torch.autograd.functional.hessian(log_joint, t.detach())
        grad = torch.autograd.functional.jacobian(log_joint, t.detach())
        t = (t.detach() - torch.linalg.solve(hess, grad)).requires_grad_()
    hess = torch.autograd.functional.hessian(log_joint, t.detach())
    blocks = -hess.diagonal()  # one local per client: the diagonal is every block
    laplace = log_joint(t.detach()) + 0.5 * num * math.log(2 * math.pi) - 0.5 * blocks.log().sum()
    with pyro.validation_enabled(False):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(batch)
    prior = sum(trace.nodes[n]["fn"].log_prob(values[n]).sum() for n in structure.global_sites)
    return float(laplace + prior + layout.log_abs_det_jacobian(z))


@pytest.mark.slow
def test_federated_equals_the_same_objective_pooled():
    data = _glmm_data()
    fit = _fit(_glmm, data)
    z = fit.server.accepted["z"]
    federated = float(fit.server.accepted["value"])
    assert federated == pytest.approx(_pooled_objective(_glmm, data, z, fit.layout), rel=1e-8)
    # ... and the federated optimum is the pooled objective's stationary point.
    mode = fit.server.posterior["mean"]
    eps = 1e-5
    for k in range(fit.layout.dim):
        e = torch.zeros_like(mode)
        e[k] = eps
        up = _pooled_objective(_glmm, data, mode + e, fit.layout)
        down = _pooled_objective(_glmm, data, mode - e, fit.layout)
        assert abs((up - down) / (2 * eps)) < 1e-4


@pytest.mark.slow
def test_vectorised_equals_inprocess():
    data = _glmm_data()
    loop = _fit(_glmm, data, engine="inprocess")
    batched = _fit(_glmm, data, engine="vectorised")
    assert [r["round"] for r in loop.history] == [r["round"] for r in batched.history]
    for a, b in zip(loop.history, batched.history):
        assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-10)
    a, b = loop.server.posterior, batched.server.posterior
    assert torch.allclose(a["mean"], b["mean"], rtol=1e-8, atol=1e-10)
    assert torch.allclose(a["covariance"], b["covariance"], rtol=1e-8, atol=1e-10)
    assert a["k_hat"] == pytest.approx(b["k_hat"], abs=1e-6)
    # The PSIS round's importance-sampled values use each client's own noise: the same
    # weights, so the same corrected posterior.
    assert torch.allclose(a["log_weights"], b["log_weights"], rtol=1e-8, atol=1e-10)


# Broadcasting idioms that are right under plain Pyro; batched draws must not change them.
def _vector_global_unsqueeze(data):
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    shrink = pyro.sample("shrink", dist.HalfNormal(1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            logits = (shrink * beta.unsqueeze(-2) * data["x"]).sum(-1) + u
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=data["y"])


def _indexed_global(data):
    difficulty = pyro.sample("difficulty", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("clients", num_clients(data), dim=-2):
        ability = pyro.sample("ability", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            logits = ability - difficulty[..., data["item"]]
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=data["y"])


def _binary_data(kind, num=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    clients = {}
    for i in range(num):
        n = 5 + i
        client = {"y": torch.randint(0, 2, (n,), generator=gen).double()}
        if kind == "vector":
            client["x"] = torch.randn(n, 2, generator=gen)
        else:
            client["item"] = torch.randint(0, 3, (n,), generator=gen)
        clients[f"c{i}"] = client
    return clients


@pytest.mark.parametrize(
    "model, kind", [(_vector_global_unsqueeze, "vector"), (_indexed_global, "item")]
)
def test_batched_draws_equal_looped_draws_and_plain_pyro(model, kind):
    data = FederatedData(_binary_data(kind))
    structure = discover_structure(model, data)
    batched = LaplaceMarginal(model, structure, data.collate())
    gen = torch.Generator().manual_seed(0)
    draws = 0.7 * torch.randn(5, batched.layout.dim, generator=gen, dtype=torch.float64)
    start = batched.initial_locals()
    values = batched.values(draws, start)
    for i in range(len(data)):
        one = LaplaceMarginal(model, structure, data.collate([i]), batched.layout)
        for s in range(len(draws)):
            looped = one.values(draws[s : s + 1], one.initial_locals())
            assert values[s, i].item() == pytest.approx(looped.item(), rel=1e-10)
    # The importance-sampled values too (the same noise, split by draw and client).
    noise = torch.randn((4,) + start.shape[:-1] + (5, batched.size), generator=gen)
    noise = noise.transpose(1, 2)  # (K, S, C, k)
    sampled = batched.values(draws, start, noise=noise)
    for i in range(len(data)):
        one = LaplaceMarginal(model, structure, data.collate([i]), batched.layout)
        looped = one.values(draws, one.initial_locals(), noise=noise[:, :, i : i + 1])
        assert torch.allclose(sampled[:, i : i + 1], looped, rtol=1e-10, atol=1e-12)
    # The log joint the clients differentiate is plain Pyro's, on one client's data.
    z, t = draws[0], torch.full((batched.size,), 0.3)
    batch = data.collate([0])
    local = structure.local_sites[0]
    conditioned = {**batched.layout.constrain(z), local: t.reshape(-1, 1)}
    trace = poutine.trace(poutine.condition(model, data=conditioned)).get_trace(batch)
    trace.compute_log_prob()
    plain = sum(trace.nodes[n]["log_prob"].sum() for n in (local, "y"))
    ours = batched.log_joint(z, t, {k: v[0] for k, v in batch.items()})
    assert ours.item() == pytest.approx(plain.item(), rel=1e-12)


def test_no_step_size_option_exists():
    params = inspect.signature(SecondOrderServer.__init__).parameters
    assert not {"lr", "server_lr", "step_size", "lr_decay"} & set(params)
    data = _glmm_data(3)
    with pytest.raises(ValueError, match="takes no step sizes"):
        FederatedSVI(_glmm, data, server="second_order", server_lr=0.1)


def test_auto_chooses_second_order_and_says_why():
    data = _glmm_data(3)
    fit = FederatedSVI(_glmm, data)
    assert fit.server.mode == "second_order"
    assert "no step size" in fit.server_choice["reason"]
    tuned = FederatedSVI(_glmm, data, local_steps=3)
    assert tuned.server.mode == "gradient"
    assert "local_steps" in tuned.server_choice["reason"]
    with pytest.raises(ValueError, match="global_guide"):
        FederatedSVI(_glmm, data, server="second_order", global_guide="auto", local_guide=dict)


@pytest.mark.slow
def test_auto_prefers_second_order_to_a_conjugate_family():
    # A conjugate Normal-Normal model with defaults: the closed-form server's clients fit
    # their blocks by Adam with first-order defaults, which stopped "converged" with a
    # client's mean 0.32 exact-posterior sd off (an sd ratio of 1.24); the second-order
    # server is exact on a Gaussian hierarchy. Its PSIS draws (~1,000 effective) leave a
    # Monte Carlo error of ~0.03 sd in a mean and ~2% in an sd: hence 0.1 and [0.95, 1.05].
    data = normal_normal.load_data()
    mean, cov = normal_normal.exact_posterior(data)
    fit = FederatedSVI(normal_normal.model, data, seed=0)
    assert fit.server.mode == "second_order"
    fit.run(progress=False)
    g = fit.global_samples(20000)
    theta = fit.local_samples(20000, global_draws=g)["theta"].reshape(20000, -1)
    draws = torch.cat([g["mu"].reshape(20000, 1), theta], 1)
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.1
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.05
    first_order = FederatedSVI(normal_normal.model, data, seed=0, local_steps=5)
    assert first_order.server.mode == "closed_form"
    assert first_order.server_choice["reason"].startswith("a conjugate family solves")


@pytest.mark.slow
def test_max_rounds_is_reported_loudly():
    fit = FederatedSVI(_glmm, _glmm_data(3), seed=0)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        fit.run(1, progress=False)
    assert fit.verdict["status"] == "max rounds reached"
    assert "k_hat" in fit.verdict  # the PSIS round still ran and checked the result


@pytest.mark.slow
def test_checkpoint_resume_continues_exactly(tmp_path):
    data = _glmm_data(4)
    whole = _fit(_glmm, data)
    first = FederatedSVI(_glmm, data, seed=0, server="second_order")
    for _ in range(2):
        first.step()
    first.checkpoint(tmp_path / "state.pt")
    resumed = FederatedSVI(_glmm, data, seed=0, server="second_order")
    resumed.resume(tmp_path / "state.pt")
    resumed.run(progress=False)
    assert resumed.round == whole.round
    assert torch.equal(resumed.server.posterior["mean"], whole.server.posterior["mean"])
    assert resumed.verdict == whole.verdict


@pytest.mark.slow
def test_a_failing_client_is_named():
    data = _glmm_data(3)
    # Data outside the likelihood's support are refused before training (issue 14); a
    # client whose rate overflows (exp(800)) passes that check and fails every round.
    data["c1"]["log_exposure"] = data["c1"]["log_exposure"] + 800.0
    fit = FederatedSVI(_glmm, data, seed=0)
    with pytest.raises(RuntimeError, match="'c1'"):
        fit.run(progress=False)


@pytest.mark.slow
def test_eight_schools_defaults_match_posteriordb(shared_data):
    """The README's main job with defaults: every mean within 0.25 reference sd and every
    sd ratio in [0.8, 1.2] (issue 20's targets). Measured: max |z| 0.064, sd ratios
    0.97-1.04 (4000 draws), 4 Newton rounds + 2 PSIS rounds, k-hat -0.08."""
    path = shared_data / "reference_posteriors" / "eight_schools_posteriordb.json"
    reference = json.loads(path.read_text())["reference_summary"]
    fit = _fit(eight_schools.noncentered, eight_schools.load_data())
    assert fit.verdict["rounds"] <= 10 and fit.verdict["reliable"]
    draws = fit.global_samples(20000)
    local = fit.local_samples(20000, global_draws=draws)
    theta = draws["mu"][:, None] + draws["tau"][:, None] * local["theta_trans"]
    checks = {"mu": draws["mu"], "tau": draws["tau"]}
    checks.update({f"theta[{j + 1}]": theta[:, j] for j in range(8)})
    for name, value in checks.items():
        ref = reference[name]
        assert abs(value.mean().item() - ref["mean"]) / ref["sd"] < 0.25, name
        assert 0.8 <= value.std().item() / ref["sd"] <= 1.2, name


@pytest.mark.slow
def test_cli_prints_the_server_the_verdict_and_a_banner(tmp_path, capsys):
    from hbfl_pyro.cli import main

    spec = str(eight_schools.__file__)
    args = ["fit", spec, "--no-progress", "--num-samples", "200", "--out", str(tmp_path)]
    assert main(args + ["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "server      second_order (continuous globals and locals" in out
    assert re.search(
        r"verdict: max rounds reached in 1 round \(\+[1-3] PSIS rounds?\); PSIS Pareto k-hat", out
    )
    assert "WARNING: this posterior is not trustworthy" in out
    report = (tmp_path / "report.md").read_text()
    assert "**Verdict:** max rounds reached in 1 round (+" in report
    assert main(args + ["--no-report"]) == 0
    out = capsys.readouterr().out
    assert "verdict: converged in" in out and "WARNING" not in out


@pytest.mark.slow
def test_compare_pooled_uses_nuts_as_the_reference():
    from hbfl_pyro.compare import compare_pooled

    fit = _fit(_glmm, _glmm_data(3))
    comparison = compare_pooled(
        fit, nuts={"warmup": 30, "samples": 30}, num_samples=200, elbo_particles=16, progress=False
    )
    assert "skipped" in comparison.settings["pooled SVI"]
    assert tuple(comparison.methods) == ("federated", "nuts")


def test_importance_sampled_values_are_laplace_for_a_gaussian_conditional():
    # y | theta ~ N(theta, 1), theta | mu ~ N(mu, 1): the locals' conditional is Gaussian,
    # so every draw of the proposal has the same weight and the estimate is L_i exactly.
    data = normal_normal.load_data(num_clients=4)
    fed = FederatedData(data)
    marginal = LaplaceMarginal(
        normal_normal.model, discover_structure(normal_normal.model, fed), fed.collate()
    )
    gen = torch.Generator().manual_seed(3)
    draws = torch.randn(6, marginal.layout.dim, generator=gen, dtype=torch.float64)
    start = marginal.initial_locals()
    noise = torch.randn((8, 6) + tuple(start.shape), generator=gen, dtype=torch.float64)
    laplace = marginal.values(draws, start)
    sampled = marginal.values(draws, start, noise=noise)
    assert torch.allclose(sampled, laplace, rtol=1e-10, atol=1e-10)


def test_the_weight_pilot_is_zero_for_a_gaussian_conditional_and_sizes_the_local_draws():
    # normal_normal's locals have a Gaussian conditional: every local weight is equal, the
    # pilot is 0 (to float error) and the PSIS round needs one local draw. The Poisson
    # GLMM's conditionals are not Gaussian: the pilot is positive and the PSIS round takes
    # ceil(pilot / LOCAL_NOISE_BUDGET) draws, at most local_draws.
    from hbfl_pyro.servers.second_order import LOCAL_NOISE_BUDGET

    gaussian = _fit(normal_normal.model, normal_normal.load_data(num_clients=4))
    assert abs(float(gaussian.server.accepted["local_noise"])) < 1e-10
    assert gaussian.verdict["local_draws"] == 1
    poisson = _fit(_glmm, _glmm_data())
    spread = float(poisson.server.accepted["local_noise"])
    assert spread > 0
    expected = min(16, max(1, math.ceil(spread / LOCAL_NOISE_BUDGET)))
    assert poisson.verdict["local_draws"] == expected


def test_weight_spread_is_the_relative_variance_of_the_local_weights():
    # One client, its pilot against the weights computed by hand: K draws of N(mode,
    # P^-1), each weighed by the model's log joint (Pyro's own trace) over that density.
    data = _glmm_data(num=2)
    fed = FederatedData(data)
    structure = discover_structure(_glmm, fed)
    marginal = LaplaceMarginal(_glmm, structure, fed.collate([1]))
    z = torch.tensor([-0.8, 0.4, -0.5], dtype=torch.float64)  # intercept, slope, log scale
    modes = marginal.modes(z, marginal.initial_locals())
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 1, 1, 1, generator=gen, dtype=torch.float64)
    spread = marginal.weight_spread(z, modes, noise)
    _, precision = marginal._parts_at_modes(z, modes)
    sd = precision[0, 0, 0].rsqrt()
    log_w = []
    for eps in noise[:, 0, 0, 0]:
        effect = modes[0, 0] + sd * eps
        values = {
            "intercept": z[0],
            "slope": z[1],
            "scale": z[2].exp(),
            "effect": effect.reshape(1, 1),
        }
        trace = poutine.trace(poutine.condition(_glmm, data=values)).get_trace(fed.collate([1]))
        trace.compute_log_prob()
        log_p = trace.nodes["effect"]["log_prob"].sum() + trace.nodes["y"]["log_prob"].sum()
        log_w.append(log_p - dist.Normal(modes[0, 0], sd).log_prob(effect))
    weights = torch.softmax(torch.stack(log_w), 0) * 8
    assert torch.allclose(spread, weights.var().reshape(1), rtol=1e-8)


def _noise_scale_model(data):
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        sigma = pyro.sample("sigma", dist.LogNormal(m, s))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1):
            pyro.sample("y", dist.Normal(0.0, sigma), obs=data["y"])


def _exact_noise_scale_posterior(ys):
    """Posterior means and sds of ``m`` and ``log s`` by quadrature on a grid (the locals
    integrated on a fine grid per client)."""
    u = torch.linspace(-7, 5, 601, dtype=torch.float64)  # log sigma
    m = torch.linspace(-2, 2, 161, dtype=torch.float64)
    log_s = torch.linspace(-5, 1.5, 161, dtype=torch.float64)
    lik = dist.Normal(0.0, u.exp()[:, None, None]).log_prob(ys).sum(-1)  # (U, C)
    post = (
        dist.Normal(0.0, 1.0).log_prob(m)[:, None]
        + (
            dist.HalfNormal(1.0).log_prob(log_s.exp()) + log_s  # + log |ds / dlog s|
        )[None]
    )
    for c in range(ys.shape[0]):
        prior = dist.Normal(m[:, None, None], log_s.exp()[None, :, None]).log_prob(u)
        post = post + torch.logsumexp(prior + lik[:, c], -1)
    w = torch.softmax(post.reshape(-1), 0).reshape(post.shape)
    out = {}
    for name, grid in (("m", m[:, None]), ("log_s", log_s[None])):
        mean = (w * grid).sum()
        out[name] = (float(mean), float((w * (grid - mean) ** 2).sum().sqrt()))
    return out


@pytest.mark.slow
def test_psis_corrects_a_skewed_local_factor():
    # 20 clients with 3 observations each and a positive local (a per-client noise sd):
    # its conditional is skewed, so the Laplace marginal is biased in the globals. The
    # default PSIS target (importance-sampled likelihoods) must recover the exact
    # posterior, computed by quadrature. Tolerances: the weighted mean's Monte Carlo error
    # is about 1/sqrt(ESS) ~ 0.04 sd with ~1000 effective draws, hence 0.1 sd; Pareto smoothing
    # truncates the largest weights and shrinks sds by a few per cent, hence [0.88, 1.12].
    gen = torch.Generator().manual_seed(1)
    sigma = torch.exp(0.5 * torch.randn(20, generator=gen, dtype=torch.float64))
    ys = sigma[:, None] * torch.randn(20, 3, generator=gen, dtype=torch.float64)
    data = {f"c{i}": {"y": ys[i]} for i in range(20)}
    exact = _exact_noise_scale_posterior(ys)
    fit = _fit(_noise_scale_model, data)
    post = fit.server.posterior
    weights = post["log_weights"].exp()
    for j, name in enumerate(("m", "log_s")):  # z = (m, log s): s is HalfNormal
        draws = post["draws"][:, j]
        mean = (weights * draws).sum()
        sd = (weights * (draws - mean) ** 2).sum().sqrt()
        assert abs(float(mean) - exact[name][0]) < 0.1 * exact[name][1], name
        assert 0.88 < float(sd) / exact[name][1] < 1.12, name
    assert fit.verdict["local_draws"] > 0 and fit.verdict["reliable"]


def test_widened_widens_only_the_coordinates_that_grew():
    from hbfl_pyro.servers.second_order import _moment_change, _widened

    proposal = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    weighted = torch.tensor([[1.44, 0.3], [0.3, 2.25]], dtype=torch.float64)
    shift, growth = _moment_change(
        torch.zeros(2, dtype=torch.float64), proposal, torch.tensor([0.6, 0.0]), weighted
    )
    assert shift == pytest.approx(0.5) and growth.tolist() == pytest.approx([1.2, 0.75])
    # The sd that grew by 1.2 grows by 1.2 again (variance x 1.44); the one that shrank
    # keeps the weighted draws' value; the correlation is kept.
    widened = _widened(weighted, growth)
    assert widened[0, 0] == pytest.approx(1.44 * 1.44) and widened[1, 1] == pytest.approx(2.25)
    assert widened[0, 1] == pytest.approx(0.3 * 1.2)


@pytest.mark.slow
def test_a_too_narrow_proposal_is_refined_even_when_k_hat_is_small(monkeypatch):
    # The skewed noise-scale model with q(z)'s covariance halved before the PSIS rounds:
    # the first round's weighted sds come out wider than its proposal's (a too-narrow
    # Gaussian can still give k-hat < 0.5: it does not draw the tail it misses), so
    # another round must follow, and the reported posterior must still be the exact one
    # within the Monte Carlo tolerances of test_psis_corrects_a_skewed_local_factor.
    original = SecondOrderServer._set_posterior

    def narrowed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.posterior["covariance"] = self.posterior["covariance"] / 2

    monkeypatch.setattr(SecondOrderServer, "_set_posterior", narrowed)
    gen = torch.Generator().manual_seed(1)
    sigma = torch.exp(0.5 * torch.randn(20, generator=gen, dtype=torch.float64))
    ys = sigma[:, None] * torch.randn(20, 3, generator=gen, dtype=torch.float64)
    exact = _exact_noise_scale_posterior(ys)
    fit = _fit(_noise_scale_model, {f"c{i}": {"y": ys[i]} for i in range(20)})
    first = fit.server.posterior["stages"][0]
    assert first["growth"] > SecondOrderServer.MAX_GROWTH and fit.verdict["psis_rounds"] >= 2
    post = fit.server.posterior
    weights = post["log_weights"].exp()
    for j, name in enumerate(("m", "log_s")):
        draws = post["draws"][:, j]
        mean = (weights * draws).sum()
        sd = (weights * (draws - mean) ** 2).sum().sqrt()
        assert abs(float(mean) - exact[name][0]) < 0.1 * exact[name][1], name
        assert 0.88 < float(sd) / exact[name][1] < 1.12, name


def test_ragged_clients_grouped_by_size_give_what_the_padded_batch_gives():
    """Clients of very different sizes are evaluated in groups padded to their own
    longest (LaplaceMarginal.max_groups): modes, derivatives, mode slopes and both kinds of
    PSIS values equal those of the batch padded to the longest client, in its order."""
    gen = torch.Generator().manual_seed(3)
    clients = {}
    for i, n in enumerate([2, 40, 3, 81, 11, 39, 80, 4]):
        clients[f"c{i}"] = {
            "y": torch.randint(0, 2, (n,), generator=gen).double(),
            "x": torch.randn(n, 2, generator=gen),
        }
    data = FederatedData(clients)
    model = _vector_global_unsqueeze
    structure = discover_structure(model, data)
    padded = LaplaceMarginal(model, structure, data.collate())
    grouped = LaplaceMarginal(model, structure, data.collate(), per_client=data.per_client)
    groups = grouped._groups()
    assert groups is not None and 2 <= len(groups[0]) <= grouped.max_groups
    assert padded._groups() is None
    z = 0.3 * torch.randn(grouped.layout.dim, generator=gen, dtype=torch.float64)
    start = grouped.initial_locals()
    modes = grouped.modes(z, start)
    torch.testing.assert_close(modes, padded.modes(z, start), rtol=1e-10, atol=1e-12)
    for a, b in zip(grouped.derivatives(z, modes), padded.derivatives(z, modes)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    slope = grouped.mode_slope(z, modes)
    torch.testing.assert_close(slope, padded.mode_slope(z, modes), rtol=1e-10, atol=1e-12)
    draws = z + 0.5 * torch.randn(6, grouped.layout.dim, generator=gen, dtype=torch.float64)
    noise = torch.randn((4, 6) + start.shape, generator=gen, dtype=torch.float64)
    for extra in ({}, {"noise": noise}):
        torch.testing.assert_close(
            grouped.values(draws, modes, z, slope, **extra),
            padded.values(draws, modes, z, slope, **extra),
            rtol=1e-10,
            atol=1e-10,
        )


def test_float32_mode_searches_stop_at_the_float_resolution():
    """In float32 a converged Newton search's moves stall near float resolution (above
    the default tol of 1e-9); the search stops there instead of running max_newton
    iterations, at the float64 search's mode to float32 accuracy."""
    clients = {
        k: {key: v.float() for key, v in c.items()} for k, c in _binary_data("vector", 6).items()
    }
    data = FederatedData(clients)
    structure = discover_structure(_vector_global_unsqueeze, data)
    single = LaplaceMarginal(_vector_global_unsqueeze, structure, data.collate())
    calls = []
    parts = single._newton_parts
    single._newton_parts = lambda *args: calls.append(1) or parts(*args)
    z = torch.full((single.layout.dim,), 0.2, dtype=torch.float32)
    modes = single.modes(z, single.initial_locals().float())
    assert modes.dtype == torch.float32 and len(calls) < 15
    double = LaplaceMarginal(
        _vector_global_unsqueeze,
        structure,
        {k: v.double() if v.is_floating_point() else v for k, v in data.collate().items()},
    )
    exact = double.modes(z.double(), double.initial_locals().double())
    torch.testing.assert_close(modes.double(), exact, rtol=0, atol=1e-5)
