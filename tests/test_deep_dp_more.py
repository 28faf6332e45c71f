"""Differential privacy of FedAvg / FedProx as FedHB families, and what stays refused.

FedProx's family (:class:`hbfl_pyro.deep.FedProxFamily`) has no second moments, so under
``dp=`` the release is ``sum_i w_i u_i`` alone (``u_i`` a client's update clipped about
the ``m0`` it was sent): sensitivity ``C`` per unit multiplicity, noise ``z C max_i w_i``
on ``sum_m``, one ``1/z``-GDP release per round (DP-FedAvg). Checked on real training of
the toy federation: zero noise and a clip never reached give the non-private run bit for
bit; a binding clip bounds every reply; the noise has that standard deviation; each
record's epsilon is :mod:`hbfl_pyro.dp`'s accountant for the rounds released; a resumed
run is the uninterrupted one. Stale participation and the mixture stay refused, and the
errors say why and what to use.
"""

import math

import pytest
import torch
from deep_toys import OPTS, toy

from hbfl_pyro import DPConfig
from hbfl_pyro import dp as dp_module
from hbfl_pyro.deep import FedHBMixture, FedProx, FedProxFamily, FlatNet, iso_prior
from hbfl_pyro.servers import FamilyDifferentialPrivacy, FamilyServer


def without(history, *keys):
    return [{k: v for k, v in r.items() if k not in ("seconds", *keys)} for r in history]


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_zero_noise_and_a_clip_never_reached_give_the_non_dp_run_exactly(mu):
    net, clients = toy()
    plain = FedProx(net, clients, mu=mu, **OPTS)
    private = FedProx(net, clients, mu=mu, dp=DPConfig(clip=1e6, noise_multiplier=0.0), **OPTS)
    plain.run(4)
    private.run(4)
    assert torch.equal(private.global_weights(), plain.global_weights())
    assert without(private.history, "epsilon", "delta") == without(plain.history)
    assert all(r["epsilon"] == math.inf for r in private.history)


def test_a_binding_clip_bounds_every_reply_and_the_epsilon_is_the_accountants():
    net, clients = toy()
    clip, z, delta = 0.05, 1.3, 1e-6
    sent, norms = {}, []

    def hook(direction, client, message):
        if direction == "down":
            sent[message["round"], client] = message["family_params"]["m0"]
        else:
            norms.append(float((message["m"] - sent[message["round"], client]).norm()))

    cfg = DPConfig(clip=clip, noise_multiplier=z, delta=delta, reproducible_noise=True)
    fit = FedProx(net, clients, mu=0.3, dp=cfg, on_message=hook, **OPTS)
    fit.run(3)
    assert max(norms) <= clip * (1 + 1e-12)
    assert sum(n > 0.99 * clip for n in norms) >= len(norms) // 2  # the clip did bind
    for r, record in enumerate(fit.history, start=1):
        assert list(record) == ["round", "clients", "epsilon", "delta", "seconds"]
        assert record["epsilon"] == dp_module.epsilon(z, r, delta, "gdp") == cfg.epsilon(r)
    assert fit.server.dp_releases == 3 and fit.privacy == cfg.report(3)
    plain = FedProx(net, clients, mu=0.3, **OPTS)
    plain.run(3)
    assert float((fit.global_weights() - plain.global_weights()).abs().max()) > 1e-3


def test_the_noise_is_dp_fedavgs():
    z, clip, d = 0.7, 0.2, 5000
    init = torch.zeros(d, dtype=torch.float64)
    sizes = [10, 20, 30, 40]
    server = FamilyDifferentialPrivacy(
        FamilyServer(FedProxFamily(init), list(range(4)), weighting="size", sizes=sizes),
        DPConfig(clip=clip, noise_multiplier=z, reproducible_noise=True),
    )
    assert server.sensitivity == clip  # no second moment: (u_i) alone
    sums = {"sum_m": torch.ones(d, dtype=torch.float64), "count": torch.tensor(4.0).double()}
    largest = 4 * 40 / 100
    noisy = server._noisy(sums, init, largest, seed=0)
    assert set(noisy) == {"sum_m", "count"} and noisy["count"] == 4.0
    noise = noisy["sum_m"] - sums["sum_m"]
    assert float(noise.std()) == pytest.approx(z * clip * largest, rel=0.03)  # 1% s.e.


def test_a_resumed_dp_fedprox_run_equals_the_uninterrupted_one(tmp_path):
    net, clients = toy()
    cfg = DPConfig(clip=0.05, noise_multiplier=1.0, reproducible_noise=True)

    def make():
        return FedProx(net, clients, mu=0.3, dp=cfg, **OPTS)

    whole = make()
    whole.run(4)
    first = make()
    first.run(2)
    first.checkpoint(tmp_path / "ckpt")
    resumed = make()
    resumed.resume(tmp_path / "ckpt")
    assert resumed.server.dp_releases == 2
    resumed.run(2)
    assert torch.equal(resumed.global_weights(), whole.global_weights())
    assert without(resumed.history) == without(whole.history)


def test_stale_participation_and_the_mixture_stay_refused_saying_why():
    net, clients = toy()
    cfg = DPConfig(clip=0.1, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="re-releases every client's latest reply") as err:
        FedProx(net, clients, participation="stale", dp=cfg, **OPTS)
    assert "participation='scaled'" in str(err.value)
    with pytest.raises(NotImplementedError, match="responsibilities") as err:
        FedHBMixture(net, clients, [iso_prior(FlatNet(net).vector())], dp=cfg)
    assert "use FedHB(..., dp=...) with one family" in str(err.value)
