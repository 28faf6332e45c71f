"""Client-level differential privacy (hbfl_pyro.dp): clipping, noise scale, accounting.

What is checked, and why it can fail:

- every message a client sends (seen through ``on_message``) has norm <= clip, and the
  bound was binding for some messages (else the test would not exercise clipping);
- the noise the server adds has standard deviation ``z * clip`` per coordinate, both on
  the raw sums and end to end in the Normal-Normal server update;
- with ``noise_multiplier=0`` and a clip no message reaches, the fit equals the non-DP fit
  bit for bit (the DP hooks change nothing else, and the noise generator does not touch
  the clients' random streams);
- the accountant against closed forms: an independent evaluation of the analytic Gaussian
  mechanism's delta(epsilon), the classical Gaussian-mechanism bound, GDP composition and
  the zCDP formula; epsilon decreases with the noise multiplier;
- noisy NIW sums are projected to sums that keep the update valid (positive definite);
- settings that cannot work are refused with errors naming the fix.
"""

import inspect
import math

import eight_schools
import normal_normal
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from hbfl_pyro import ClosedFormServer, FederatedSVI, NIWFull, Server, num_clients
from hbfl_pyro import dp as dp_module
from hbfl_pyro import server as server_module
from hbfl_pyro.dp import (
    DPConfig,
    epsilon,
    gdp_epsilon,
    message_norm,
    noise_multiplier_for,
    project_moments,
    zcdp_epsilon,
)
from hbfl_pyro.seeding import derive_seed
from hbfl_pyro.servers import DifferentialPrivacy, ServerStrategy

DELTA = 1e-5
CASES = {
    # closed form: the message is E_q[theta_i]; after a few Adam steps of size 0.05 from its
    # initial value it has moved by a few tenths, so a clip of 0.1 binds
    "normal_normal-closed_form": (
        normal_normal.model,
        lambda: normal_normal.load_data(num_clients=6),
        "auto",
        1.0,
        0.1,
    ),
    # gradient mode with half participation (scaled sums): gradients of the client block
    "eight_schools-gradient": (
        eight_schools.noncentered,
        eight_schools.load_data,
        "gradient",
        0.5,
        0.05,
    ),
}


def _fit(case, dp, on_message=None, rounds=3, engine="inprocess"):
    model, load, server, fraction, _ = CASES[case]
    fit = FederatedSVI(
        model,
        load(),
        server=server,
        fraction=fraction,
        local_steps=3,
        grad_particles=2,
        server_particles=2,
        seed=0,
        dp=dp,
        on_message=on_message,
        engine=engine,
    )
    fit.run(rounds, progress=False)
    return fit


def _payload(message):
    return message["stats"] if "stats" in message else message["grads"]


# ---------------------------------------------------------------------- clipping
@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_client_message_is_clipped(case, engine):
    clip = CASES[case][4]
    dp = DPConfig(clip=clip, noise_multiplier=1.0, delta=DELTA)
    ups = []
    fit = _fit(case, dp, lambda d, c, m: ups.append(m) if d == "up" else None, engine=engine)
    assert len(ups) == sum(len(r["clients"]) for r in fit.history) > 0
    norms = torch.stack([message_norm(_payload(m)) for m in ups])
    # Clipping scales by clip / norm: the result's norm is clip up to float64 round-off.
    assert bool((norms <= clip * (1 + 1e-12)).all()), norms.max()
    # At least one message must have been clipped for this test to exercise clipping.
    assert bool((norms > clip * (1 - 1e-12)).any())
    assert all(m["elbo"] == 0.0 for m in ups)  # no ELBO value leaves a client under DP
    for r in fit.history:
        assert math.isnan(r["elbo"]) and r["delta"] == DELTA
    assert [r["epsilon"] for r in fit.history] == [dp.epsilon(t) for t in (1, 2, 3)]
    assert fit.privacy["epsilon"] == dp.epsilon(3) and fit.privacy["rounds"] == 3


def test_clip_message_unit():
    dp = DPConfig(clip=1.0, noise_multiplier=1.0)
    small = {"a": torch.tensor([0.3, 0.4]), "count": torch.tensor(1.0)}
    out = dp.clip_message(small)
    assert all(out[k] is small[k] for k in small)  # within the bound: unchanged, bit for bit
    big = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]]), "count": torch.tensor(1.0)}
    out = dp.clip_message(big)
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.0]), rtol=1e-15)
    assert torch.allclose(out["b"], torch.tensor([[0.8]]), rtol=1e-15)
    assert torch.equal(out["count"], big["count"])  # the public count is neither clipped nor noised
    with pytest.raises(ValueError, match="'count' is treated as public"):
        dp.clip_message({"a": torch.tensor([1.0]), "count": torch.tensor(2.0)}, "client 'x'")


# ---------------------------------------------------------------------- noise
def test_noise_on_the_sum_has_standard_deviation_z_times_clip():
    z, clip, draws = 1.7, 0.5, 4000
    dp = DPConfig(clip=clip, noise_multiplier=z)
    messages = [{"g": torch.tensor([0.1, -0.2, 0.3]), "h": torch.tensor(0.2)} for _ in range(4)]
    exact = {"g": 4 * messages[0]["g"], "h": 4 * messages[0]["h"]}
    noise = torch.stack(
        [
            torch.cat([(s["g"] - exact["g"]), (s["h"] - exact["h"]).reshape(1)])
            for s in (dp.noisy_sum(messages, seed=i) for i in range(draws))
        ]
    )  # (draws, 4): four coordinates, each should be N(0, (z clip)^2), independent
    n = noise.numel()
    sd = noise.std()
    # The sample sd of n normal draws has relative standard error 1/sqrt(2n) (0.56% here);
    # 3% is over 5 standard errors. The mean has standard error sd/sqrt(n).
    assert abs(float(sd) / (z * clip) - 1) < 0.03, float(sd)
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(n)
    # Coordinates are uncorrelated: sample correlations of 4000 draws have sd 1/sqrt(4000).
    corr = torch.corrcoef(noise.T) - torch.eye(4)
    assert float(corr.abs().max()) < 5 / math.sqrt(draws)


@pytest.mark.slow
def test_noise_scale_end_to_end_in_the_normal_server_update():
    """q(mu)'s mean moves by (z C / tau^2) / precision per round's noise, nothing else."""
    z, clip = 0.8, 50.0  # no client reaches the clip: only the noise moves the update
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=6),
        local_steps=2,
        seed=0,
        dp=DPConfig(clip=clip, noise_multiplier=z, reproducible_noise=True),  # fixed seed
    )
    fit.run(1, progress=False)
    server, family = fit.server, fit.family
    replies = dict(server.stale)  # stale participation: every later round sums this pool
    exact = family.server_update(
        {k: sum(r["stats"][k] for r in replies.values()) for k in ("sum_mean", "count")},
        server.num_clients,
    )["loc"]
    draws = 2000
    locs = []
    for r in range(2, 2 + draws):  # fresh noise each round (its generator is seeded by round)
        server.aggregate(r, replies)
        locs.append(server.family_params["loc"])
    shift = torch.stack(locs).reshape(-1) - exact
    precision = family.prior_scale.pow(-2) + server.num_clients / family.scale.pow(2)
    want = float(z * clip / family.scale.pow(2) / precision)
    # Relative standard error of the sample sd of 2000 draws: 1/sqrt(4000) = 1.6%; 7% is
    # over 4 standard errors.
    assert abs(float(shift.std()) / want - 1) < 0.07, (float(shift.std()), want)
    assert abs(float(shift.mean())) < 5 * want / math.sqrt(draws)
    assert server.dp_releases == 1 + draws
    assert fit.privacy["epsilon"] == epsilon(z, 1 + draws, 1e-5)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_noise_and_a_huge_clip_give_the_non_dp_fit_exactly(case):
    plain = _fit(case, None)
    private = _fit(case, DPConfig(clip=1e12, noise_multiplier=0.0))
    a, b = plain.state_dict(), private.state_dict()
    if plain.family is not None:
        for k, v in a["server"]["family_params"].items():
            assert torch.equal(v, b["server"]["family_params"][k]), k
    else:
        for k, v in a["server"]["global_guide"].items():
            assert torch.equal(v, b["server"]["global_guide"][k]), k
    for name, client in a["clients"].items():
        for k, v in client["guide"].items():
            assert torch.equal(v, b["clients"][name]["guide"][k]), (name, k)
    assert private.privacy["epsilon"] == math.inf  # z = 0 is clipping without privacy


# ---------------------------------------------------------------------- accounting
def _delta_reference(eps, mu):
    """Balle & Wang (2018) Thm 8, written independently with math.erfc."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


@pytest.mark.parametrize("z", [0.7, 1.0, 3.0, 10.0])
def test_one_round_is_the_analytic_gaussian_mechanism(z):
    eps = epsilon(z, 1, DELTA)
    # The root of delta(eps) = DELTA to the solver's tolerance (xtol 1e-12 in eps; the
    # slope |d delta / d eps| is below 1, so delta is matched to far better than 1e-9).
    assert abs(_delta_reference(eps, 1 / z) - DELTA) < 1e-9 * DELTA + 1e-15
    assert _delta_reference(eps * 0.999, 1 / z) > DELTA  # and it is the smallest such eps
    # The classical bound (Dwork & Roth Thm A.1): sigma = sqrt(2 ln(1.25/delta)) / eps is
    # enough for eps < 1, so the exact epsilon at that sigma can only be smaller.
    classical = math.sqrt(2 * math.log(1.25 / DELTA)) / z
    if classical < 1:
        assert eps <= classical


def test_composition_and_the_zcdp_formula():
    z, rounds = 2.0, 25
    # T rounds of 1/z-GDP compose to sqrt(T)/z-GDP: T rounds at z == one round at z/sqrt(T).
    assert epsilon(z, rounds, DELTA) == epsilon(z / math.sqrt(rounds), 1, DELTA)
    rho = rounds / (2 * z**2)
    want = rho + 2 * math.sqrt(rho * math.log(1 / DELTA))
    assert epsilon(z, rounds, DELTA, "zcdp") == pytest.approx(want, rel=1e-15)
    assert zcdp_epsilon(0.5, DELTA) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e5)))
    # The exact accountant is never looser than the zCDP conversion.
    for zz in (0.5, 1.0, 2.0, 5.0):
        assert epsilon(zz, rounds, DELTA) < epsilon(zz, rounds, DELTA, "zcdp")
    assert gdp_epsilon(0.0, DELTA) == 0.0 and epsilon(1.0, 0, DELTA) == 0.0


@pytest.mark.parametrize("accountant", ["gdp", "zcdp"])
def test_epsilon_decreases_with_the_noise_multiplier(accountant):
    zs = [0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    eps = [epsilon(z, 50, DELTA, accountant) for z in zs]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert epsilon(1.0, 10, DELTA, accountant) < epsilon(1.0, 20, DELTA, accountant)


def test_target_epsilon_is_met_and_the_budget_enforced():
    dp = DPConfig(clip=1.0, target_epsilon=2.0, rounds=4, delta=DELTA)
    assert dp.epsilon(4) <= 2.0
    assert dp.epsilon(4) == pytest.approx(2.0, rel=1e-9)
    assert noise_multiplier_for(2.0, DELTA, 4) == dp.noise_multiplier
    fit = FederatedSVI(
        normal_normal.model, normal_normal.load_data(num_clients=3), local_steps=1, dp=dp
    )
    fit.run(4, progress=False)
    assert fit.privacy["epsilon"] <= 2.0
    with pytest.raises(RuntimeError, match="exceed the privacy budget"):
        fit.step()


# ---------------------------------------------------------------------- valid updates
def test_projection_of_noisy_moments():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sums = {"sum_m": m.sum(0), "sum_mm": m.T @ m + torch.eye(3)}  # feasible: unchanged
    out = project_moments(sums, 5)
    assert torch.allclose(out["sum_mm"], sums["sum_mm"], rtol=0, atol=1e-12)
    bad = {"sum_m": sums["sum_m"], "sum_mm": sums["sum_mm"] - 30 * torch.eye(3)}
    fixed = project_moments(bad, 5)["sum_mm"]
    scatter = fixed - torch.outer(bad["sum_m"], bad["sum_m"]) / 5
    assert float(torch.linalg.eigvalsh(scatter).min()) > -1e-12
    diag = project_moments(
        {"sum_m": torch.tensor([2.0, 0.0]), "sum_mm": torch.tensor([-1.0, 3.0])}, 2
    )
    assert torch.equal(diag["sum_mm"], torch.tensor([2.0, 3.0]))
    iso = project_moments({"sum_m": torch.tensor([2.0, 2.0]), "sum_mm": torch.tensor(-1.0)}, 2)
    assert float(iso["sum_mm"]) == 4.0


@pytest.mark.slow
def test_niw_full_update_stays_positive_definite_under_heavy_noise(monkeypatch):
    d = 2
    fam = NIWFull(d)

    def model(data):
        phi = fam.sample_global()
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = fam.sample_local(phi)
            with pyro.plate("obs", data["y"].shape[-2], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=data["y"])

    infeasible = []  # rounds whose raw noisy sums no clients could have produced

    def recording(sums, n):
        scatter = sums["sum_mm"] - torch.outer(sums["sum_m"], sums["sum_m"]) / n
        infeasible.append(float(torch.linalg.eigvalsh(0.5 * (scatter + scatter.T)).min()) < 0)
        return project_moments(sums, n)

    monkeypatch.setattr(dp_module, "project_moments", recording)
    gen = torch.Generator().manual_seed(3)
    data = {f"c{i}": {"y": torch.randn(4, d, generator=gen) + i % 3} for i in range(5)}
    # z * clip = 20 dwarfs the summaries (norms of a few units), so raw noisy sums are
    # often infeasible; the test requires that this happened.
    fit = FederatedSVI(model, data, server=fam, local_steps=2, seed=0,
                       dp=DPConfig(clip=5.0, noise_multiplier=4.0,
                                   reproducible_noise=True))  # fmt: skip
    for _ in range(6):
        fit.step()
        v0 = fit.server.family_params["V0"]
        assert float(torch.linalg.eigvalsh(v0).min()) > 0
        # V0 - Sigma0 is the (PSD) scatter term, as without noise.
        assert float(torch.linalg.eigvalsh(v0 - fam.Sigma0).min()) > -1e-9
    assert len(infeasible) == 6 and any(infeasible)


# ---------------------------------------------------------------------- errors, state
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip must be a finite number > 0"),
        ({"clip": -1.0, "noise_multiplier": 1.0}, "clip must be a finite number > 0"),
        ({"clip": float("nan"), "noise_multiplier": 1.0}, "clip must be a finite number > 0"),
        ({"clip": 1.0, "noise_multiplier": -0.1}, "noise_multiplier must be a finite number"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, "delta must be in"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta must be in"),
        ({"clip": 1.0}, "exactly one of noise_multiplier"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 1.0}, "exactly one"),
        ({"clip": 1.0, "target_epsilon": 1.0}, "needs rounds="),
        ({"clip": 1.0, "target_epsilon": -1.0, "rounds": 3}, "target_epsilon must be > 0"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "accountant": "rdp"}, "accountant must be"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


def test_dp_must_be_a_config_and_checkpoints_keep_the_account(tmp_path):
    data = normal_normal.load_data(num_clients=3)
    with pytest.raises(TypeError, match="dp must be a hbfl_pyro.dp.DPConfig"):
        FederatedSVI(normal_normal.model, data, dp={"clip": 1.0})
    dp = DPConfig(clip=5.0, noise_multiplier=1.0, reproducible_noise=True)  # to compare runs
    fit = FederatedSVI(normal_normal.model, data, local_steps=1, dp=dp)
    fit.run(2, progress=False)
    fit.checkpoint(tmp_path / "dp.pt")
    again = FederatedSVI(normal_normal.model, data, local_steps=1, dp=dp)
    again.resume(tmp_path / "dp.pt")
    again.run(1, progress=False)
    fit.run(1, progress=False)
    assert again.privacy == fit.privacy and again.privacy["rounds"] == 3
    assert torch.equal(again.server.family_params["loc"], fit.server.family_params["loc"])
    plain = FederatedSVI(normal_normal.model, data, local_steps=1)
    plain.run(1, progress=False)
    plain.checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="without differential privacy"):
        FederatedSVI(normal_normal.model, data, local_steps=1, dp=dp).resume(tmp_path / "plain.pt")

    with pytest.raises(ValueError, match="ran with noise multiplier 1 .*Resume with the same"):
        other = DPConfig(clip=5.0, noise_multiplier=2.0)
        FederatedSVI(normal_normal.model, data, local_steps=1, dp=other).resume(tmp_path / "dp.pt")


def test_noise_is_fresh_unless_asked_to_be_reproducible():
    """By default the noise comes from OS entropy: two runs with the same seed get different
    noise (whoever knows the seed cannot regenerate it); reproducible_noise=True repeats."""
    data = normal_normal.load_data(num_clients=3)

    def loc(dp):
        fit = FederatedSVI(normal_normal.model, data, local_steps=1, seed=0, dp=dp)
        fit.run(1, progress=False)
        return fit.server.family_params["loc"]

    fresh = DPConfig(clip=5.0, noise_multiplier=1.0)
    assert not torch.equal(loc(fresh), loc(fresh))
    fixed = DPConfig(clip=5.0, noise_multiplier=1.0, reproducible_noise=True)
    assert torch.equal(loc(fixed), loc(fixed))


def test_a_reply_with_a_wrong_public_count_is_left_out():
    """Under DP the public 'count' must be 1: a reply claiming more is left out with a
    ClientFailureWarning naming the client (it never enters the stale pool)."""
    from hbfl_pyro import ClientFailureWarning

    def tamper(direction, client, message):
        if direction == "up" and client == "client01":
            message["stats"]["count"] = message["stats"]["count"] * 2

    data = normal_normal.load_data(num_clients=3)
    dp = DPConfig(clip=5.0, noise_multiplier=1.0)
    # Opted in to dropping it: otherwise a client that never sends a usable reply stops
    # the fit (tests/test_client_failures.py).
    fit = FederatedSVI(
        normal_normal.model,
        data,
        local_steps=1,
        dp=dp,
        on_message=tamper,
        on_client_failure="drop",
    )
    with pytest.warns(ClientFailureWarning, match="client01.*public 'count' is not 1"):
        fit.run(1, progress=False)
    assert "client01" not in fit.server.stale and len(fit.server.stale) == 2
    assert fit.verdict["dropped_clients"] == ["client01"]


# ---------------------------------------------------------------------- the wrapper
# q(phi) after 3 rounds of each fit below, as the DP code inside hbfl_pyro.server computed
# it before DP became the DifferentialPrivacy wrapper (commit 54352b5; float.hex, exact).
PRE_WRAPPER = {
    "closed_form": {
        "loc": "0x1.4821a0906245ap-4",
        "scale": "0x1.a0a8e18091998p-1",
    },
    "gradient": {
        "locs.mu_unconstrained": "0x1.f9eb7840a9c05p-4",
        "locs.tau_unconstrained": "0x1.339b48e8b94afp-3",
        "scales.mu_unconstrained": "-0x1.0d175571792fap+1",
        "scales.tau_unconstrained": "-0x1.0d2074896f9cfp+1",
    },
}


def _wrapped_fit(mode, on_message=None):
    """Half the clients per round (stale pool in closed form, scaled sums in gradient
    mode), a clip that binds, reproducible noise: every part of the DP path is exercised."""
    if mode == "closed_form":
        model, data, options, clip = normal_normal.model, normal_normal.load_data(6), {}, 0.1
    else:
        model, data, clip = eight_schools.noncentered, eight_schools.load_data(), 0.05
        options = dict(server="gradient", grad_particles=2, server_particles=2)
    dp = DPConfig(clip=clip, noise_multiplier=1.0, reproducible_noise=True)
    return FederatedSVI(
        model, data, fraction=0.5, local_steps=3, seed=0, dp=dp, on_message=on_message, **options
    )


@pytest.mark.parametrize("mode", sorted(PRE_WRAPPER))
def test_the_wrapper_gives_the_pre_wrapper_fit_exactly(mode):
    fit = _wrapped_fit(mode)
    assert isinstance(fit.server, DifferentialPrivacy) and fit.server.mode == mode
    fit.run(3, progress=False)
    state = fit.state_dict()["server"]
    params = state["family_params" if mode == "closed_form" else "global_guide"]
    assert {k: float(v).hex() for k, v in params.items()} == PRE_WRAPPER[mode]
    assert state["dp_releases"] == fit.server.dp_releases == 3
    assert [r["epsilon"] for r in fit.history] == [fit.dp.epsilon(t) for t in (1, 2, 3)]
    # what reads the wrapped server (draws of q(phi), the ELBO) sees through the wrapper
    assert fit.global_samples(4)[fit.structure.global_sites[0]].shape[0] == 4
    assert math.isfinite(fit.elbo(num_particles=2))


@pytest.mark.parametrize("mode", sorted(PRE_WRAPPER))
def test_the_wrapped_server_sees_only_noisy_sums(mode, monkeypatch):
    """The wrapped server holds no DP code: its own aggregate is never called under DP, and
    the only sum its update gets is the noisy sum of its pool's re-clipped payloads."""
    fit = _wrapped_fit(mode)
    server = fit.server.strategy
    assert not {"dp", "dp_releases"} & set(vars(server))
    source = inspect.getsource(server_module)
    assert not any(word in source for word in ("noisy_sum", "noise_seed", "epsilon", "clip"))

    def refuse(*args, **kwargs):
        raise AssertionError("the wrapped server's aggregate ran under DP")

    monkeypatch.setattr(server, "aggregate", refuse)
    seen = []
    update = server.update

    def recording(server_round, record, pool, total):
        _, key = server.expected_reply()
        seen.append((server_round, [r[key] for r in pool.values()], total))
        return update(server_round, record, pool, total)

    monkeypatch.setattr(server, "update", recording)
    fit.run(2, progress=False)
    assert [r for r, _, _ in seen] == [1, 2]
    for server_round, payloads, total in seen:
        want = fit.dp.noisy_sum(payloads, derive_seed(0, server_round, "dp"))
        plain = {k: sum(p[k] for p in payloads) for k in total}
        assert list(total) == list(want)
        assert all(torch.equal(total[k], want[k]) for k in want)
        assert not all(torch.equal(total[k], plain[k]) for k in plain)


def test_the_wrapper_reads_and_writes_through_to_the_server():
    """What is set on the wrapper lands on the wrapped server (a DP fit's q(phi) can be
    set as a plain fit's is), except the wrapper's own DP state."""
    fit = _wrapped_fit("closed_form")
    wrapper, server = fit.server, fit.server.strategy
    new = {k: v + 1.0 for k, v in server.family_params.items()}
    wrapper.family_params = new
    assert server.family_params is new and "family_params" not in vars(wrapper)
    wrapper.dp_releases = 7
    assert wrapper.dp_releases == 7 and "dp_releases" not in vars(server)


def test_server_dp_is_deprecated_and_builds_the_wrapper():
    """The old spellings keep working for one release: Server(..., dp=cfg) returns the
    wrapper, and a server's dp / dp_releases read None / 0, each with a DeprecationWarning."""
    data = normal_normal.load_data(num_clients=3)
    fit = FederatedSVI(normal_normal.model, data, seed=0, server="first_order")
    plain = fit.server
    args = (fit.data.names, fit.model, fit.structure, fit.data.placeholder(), None, fit.family)
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0)
    with pytest.warns(DeprecationWarning, match=r"DifferentialPrivacy\(Server\(...\), cfg\)"):
        wrapped = Server(*args, seed=0, dp=cfg)
    assert isinstance(wrapped, DifferentialPrivacy) and wrapped.dp is cfg
    assert isinstance(wrapped.strategy, ClosedFormServer) and wrapped.participation == "scaled"
    with pytest.warns(DeprecationWarning, match="Server.dp is deprecated"):
        assert plain.dp is None
    with pytest.warns(DeprecationWarning, match="Server.dp_releases is deprecated"):
        assert plain.dp_releases == 0


def test_the_wrapper_refuses_what_it_cannot_privatise():
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=3),
        seed=0,
        dp=DPConfig(clip=1.0, noise_multiplier=1.0),
    )
    # Secure aggregation: the server could not re-clip each reply (the sensitivity would
    # rest on every client clipping honestly).
    with pytest.raises(NotImplementedError, match="secure aggregation with differential"):
        fit.server.sum_layout(1)
    with pytest.raises(NotImplementedError, match="secure aggregation with differential"):
        fit.server.aggregate_sum(1, {}, [])

    class SecondOrderLike(ServerStrategy):  # any strategy without clippable replies
        mode = "second_order"
        message = aggregate = state_dict = check_state = load_state_dict = None

    with pytest.raises(TypeError, match="first-order replies.*server='gradient'"):
        DifferentialPrivacy(SecondOrderLike(), fit.dp)
    with pytest.raises(TypeError, match="dp must be a hbfl_pyro.dp.DPConfig"):
        DifferentialPrivacy(fit.server.strategy, {"clip": 1.0})
