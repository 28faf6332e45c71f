"""Models that are right under plain Pyro stay right after the fit (issue 20 point 5): the
summary's deterministic sites and the ArviZ export replay the model over the posterior
draws, batched when the model broadcasts over a leading draws dimension and draw by draw
when it does not (or when the batched values disagree), and models without local sites or
with a ``pyro.factor`` likelihood export too (the held-out sweep's crashes, session 9).
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from hbfl_pyro import FederatedSVI, num_clients, replay
from hbfl_pyro.export import to_inference_data
from hbfl_pyro.replay import batched_or_looped
from hbfl_pyro.summary import posterior_summary

FAST = dict(psis_draws=200, seed=0)


def _clients(num=4, n=12, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(num):
        x = torch.randn(n, p, generator=gen)
        y = (torch.rand(n, generator=gen) < torch.sigmoid(x[:, 0] - 0.3)).double()
        out[f"c{i}"] = {"x": x, "y": y}
    return out


def matmul_model(data):
    """``x @ beta`` with a scale times a vector global: fine in plain Pyro, but not under
    a particle plate (a leading draws dimension meets the matrix product)."""
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    beta = pyro.deterministic("beta", tau * z, event_dim=1)
    x, y, mask = data["x"], data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", y.shape[-1], dim=-1), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Bernoulli(logits=u + x @ beta), obs=y)


def test_a_model_that_does_not_broadcast_is_summarised_and_exported_draw_by_draw(monkeypatch):
    """The batched replay of ``x @ beta`` fails; the draws are then run one at a time in
    plain Pyro's shapes, vectorised by vmap (no slow loop, so no warning)."""
    monkeypatch.setattr(replay, "_WARNED", set())  # it warns once per process
    fit = FederatedSVI(matmul_model, _clients(), **FAST)
    fit.run(progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not broadcast")
        rows = posterior_summary(fit, num_samples=50, seed=0)
    beta_rows = [r for r in rows if r["site"] == "beta"]
    assert len(beta_rows) == 3
    # The deterministic draws are the function of the global draws (same seed, same draws).
    g = fit.global_samples(50)
    expected = (g["tau"][:, None] * g["z"]).mean(0)
    got = torch.tensor([r["mean"] for r in beta_rows])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not broadcast")
        idata = to_inference_data(fit, 30, seed=0)
    assert idata.log_likelihood["y"].shape[-1] == 4  # one per client
    assert idata.posterior["beta"].shape[-1] == 3


def no_locals_model(data):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    x, y, mask = data["x"], data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        with pyro.plate("obs", y.shape[-1], dim=-1), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Bernoulli(logits=alpha + (x * beta).sum(-1)), obs=y)


def test_a_model_without_local_sites_fits_summarises_and_exports():
    fit = FederatedSVI(no_locals_model, _clients(), **FAST)
    fit.run(progress=False)
    assert fit.server.mode == "second_order" and fit.verdict["status"] == "converged"
    assert fit.local_samples(10) == {}
    rows = posterior_summary(fit, num_samples=50, seed=0)
    assert {r["site"] for r in rows} == {"alpha", "beta"}
    idata = to_inference_data(fit, 30, seed=0)
    assert "y" in idata.log_likelihood


def factor_model(data):
    """A Poisson likelihood written with ``pyro.factor`` (as a zero-inflated one often is)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    y, mask = data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        u = pyro.sample("u", dist.Normal(mu, 1.0))
        with pyro.plate("obs", y.shape[-1], dim=-1), pyro.poutine.mask(mask=mask):
            pyro.factor("lik", dist.Poisson(u.exp()).log_prob(y))


def test_a_factor_likelihood_is_in_the_export_without_replicated_data():
    gen = torch.Generator().manual_seed(1)
    clients = {
        f"c{i}": {"y": torch.poisson(torch.full((8,), 3.0), generator=gen)} for i in range(4)
    }
    fit = FederatedSVI(factor_model, clients, **FAST)
    fit.run(progress=False)
    idata = to_inference_data(fit, 30, seed=0)
    assert "lik" in idata.log_likelihood
    assert "lik" not in getattr(idata, "posterior_predictive", {})


def test_batched_values_that_disagree_with_single_draws_are_recomputed():
    """A computation that runs batched without an error but mixes the draws (here: every
    draw gets the batch mean) is caught by the two-draw check and recomputed one draw at a
    time (vmapped: no warning)."""

    def mixing(draws, index):
        return {"y": draws["x"].mean(0, keepdim=True).expand(len(draws["x"]))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = batched_or_looped(mixing, {"x": torch.arange(4.0)}, "mixing")
    torch.testing.assert_close(out["y"], torch.arange(4.0))


def test_a_computation_that_cannot_run_under_vmap_is_looped_with_a_warning(monkeypatch):
    """Python control flow on a value fails under vmap: the draws are then computed in a
    Python loop, and the user is told once why it is slow."""
    monkeypatch.setattr(replay, "_WARNED", set())

    def branching(draws, index):
        if index is None:
            raise RuntimeError("shape mismatch")
        x = draws["x"]
        return {"y": 2 * x if float(x) > 1 else x}

    with pytest.warns(UserWarning, match="does not broadcast.*one at a time"):
        out = batched_or_looped(branching, {"x": torch.arange(4.0)}, "branching")
    torch.testing.assert_close(out["y"], torch.tensor([0.0, 1.0, 4.0, 6.0]))


def test_random_outputs_of_vmapped_draws_differ_draw_by_draw():
    """Replicated data of a vmapped replay are drawn independently per draw."""

    def replicate(draws, index):
        if index is None:
            raise RuntimeError("shape mismatch")
        return {"mean": draws["x"], "random:y": draws["x"] + torch.randn(1)}

    out = batched_or_looped(replicate, {"x": torch.zeros(200)}, "replicate")
    noise = out["random:y"]
    assert noise.shape == (200,)
    # 200 standard normal draws: their sd is 1 within 0.2 (about 4 standard errors).
    assert abs(float(noise.std()) - 1.0) < 0.2 and len(set(noise.tolist())) == 200
