"""FedAvg / FedProx are FedHB with a server family (issue 17 point 4).

:class:`hbfl_pyro.deep.FedProx` is :class:`~hbfl_pyro.deep.FedHB` given
:class:`~hbfl_pyro.deep.FedProxFamily`, the family whose fixed prox is stated per example
(FedProx's ``mu``), so FedAvg, FedProx, FedHB and the mixture differ only by the server
family: the strategy (selection, participation, weighting), the messages, the failure
handling and the state are one code path. What is checked:

- ``FedProx(mu)`` is ``FedHB(FedProxFamily(init, mu), weighting="size")`` bit for bit;
- it is the independent plain FedProx (per-example ``mu``, clients of unequal sizes) to
  float error, in float64 and float32 (no limit of the NIW family is needed);
- a state of FedProx's former layout (``"weights"``) still resumes, and the fingerprint
  of a default FedProx is what it was (old checkpoint files resume);
- FedHB's options work for FedProx (stale participation, message hooks) and enter its
  fingerprint.
"""

import pytest
import torch
from deep_toys import OPTS, toy

from hbfl_pyro.deep import FedHB, FedProx, FedProxFamily, FlatNet, LocalSpec, reference_fedavg
from hbfl_pyro.servers import FamilyServer


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("mu", [0.0, 0.3])
@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
def test_fedprox_is_fedhb_with_the_fedprox_family(mu, engine):
    net, clients = toy()
    fit = FedProx(net, clients, mu=mu, engine=engine, **OPTS)
    family = FedProxFamily(FlatNet(net).vector(), mu)
    hb = FedHB(net, clients, family, weighting="size", engine=engine, **OPTS)
    assert isinstance(fit, FedHB) and type(fit.server) is type(hb.server) is FamilyServer
    assert isinstance(fit.family, FedProxFamily) and fit.mu == mu
    fit.run(3)
    hb.run(3)
    assert torch.equal(fit.global_weights(), hb.global_weights())
    assert without_seconds(fit.history) == without_seconds(hb.history)
    assert list(fit.history[0]) == ["round", "clients", "seconds"]  # FedProx's records


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighting", ["size", "equal"])
def test_fedprox_is_the_plain_reference_with_a_per_example_mu(dtype, weighting):
    net, clients = toy()  # sizes 5 to 20: the same mu for every client, not P / n_i
    net = net.to(dtype)
    clients = [(x.to(dtype), y) for x, y in clients]
    spec = LocalSpec(epochs=2, batch_size=4, lr=0.1)
    mu = 0.7
    fit = FedProx(net, clients, mu=mu, weighting=weighting, fraction=0.5, local=spec, seed=3)
    fit.run(3)
    ref = reference_fedavg(
        net, clients, 3, fraction=0.5, epochs=2, batch_size=4, lr=0.1, mu=mu,
        weighting=weighting, seed=3,
    )  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    diff = float((fit.global_weights() - FlatNet(ref).vector()).abs().max())
    assert diff < tol
    plain = reference_fedavg(net, clients, 3, fraction=0.5, epochs=2, batch_size=4, lr=0.1, seed=3)
    assert float((FlatNet(plain).vector() - FlatNet(ref).vector()).abs().max()) > 1e-3


def test_a_state_of_the_former_layout_resumes():
    """Before FedProx was a FedHB family, its state held the global weights alone."""
    net, clients = toy()
    whole = FedProx(net, clients, mu=0.3, **OPTS)
    whole.run(4)
    first = FedProx(net, clients, mu=0.3, **OPTS)
    first.run(2)
    state = first.state_dict()
    assert set(state) == {"trainer", "round", "history", "server", "own"}
    former = {k: v for k, v in state.items() if k not in ("server", "own")}
    former["weights"] = first.global_weights().clone()
    resumed = FedProx(net, clients, mu=0.3, **OPTS)
    resumed.load_state_dict(former)
    resumed.run(2)
    assert torch.equal(resumed.global_weights(), whole.global_weights())
    assert without_seconds(resumed.history) == without_seconds(whole.history)


def test_the_fingerprint_keeps_fedproxs_settings_and_adds_fedhbs_options():
    net, clients = toy()
    default = FedProx(net, clients, mu=0.3, **OPTS).fingerprint()
    assert default["trainer"] == "FedProx"
    assert default["settings"] == {"mu": 0.3, "weighting": "size"}  # as before: files resume
    stale = FedProx(net, clients, mu=0.3, participation="stale", **OPTS)
    assert stale.fingerprint()["settings"] == {
        "mu": 0.3,
        "weighting": "size",
        "participation": "stale",
    }


def test_fedprox_takes_fedhbs_participation_and_message_hooks():
    net, clients = toy()
    log = []
    fit = FedProx(
        net, clients, mu=0.3, participation="stale", on_message=lambda *m: log.append(m), **OPTS
    )
    seen = set()
    for record in fit.run(3):
        seen.update(record["clients"])
    assert sorted(fit.server.stale) == sorted(seen)  # every client's latest reply is pooled
    down = [m for d, _, m in log if d == "down"]
    assert down and all(set(m["family_params"]) == {"m0"} for m in down)
    # Stale FedProx averages every client's latest m_i: not the scaled run.
    scaled = FedProx(net, clients, mu=0.3, **OPTS)
    scaled.run(3)
    assert not torch.equal(fit.global_weights(), scaled.global_weights())


def test_the_family_checks_mu_and_weighting_is_checked():
    net, clients = toy()
    with pytest.raises(ValueError, match="mu must be >= 0"):
        FedProx(net, clients, mu=-1.0)
    with pytest.raises(ValueError, match="weighting must be 'size' or 'equal'"):
        FedProx(net, clients, weighting="data")
