"""Deep FedHB's server update is a server strategy (issue 17 point 4).

:class:`~hbfl_pyro.deep.FedHB` holds a :class:`~hbfl_pyro.servers.closed_form.FamilyServer`:
selection, participation, weighting, the closed-form update and the checkpointed state are
the strategy's, and FedAvg / FedProx / FedHB differ only by the family it is given. The
trainer hands it weighted sums (``aggregate_sum``); the strategy's per-client path
(``aggregate``) gives the same ``q(phi)`` bit for bit.
"""

import pytest
import torch
from deep_toys import OPTS, toy

from hbfl_pyro import ClientFailureWarning
from hbfl_pyro.deep import (
    FedHB,
    FedHBMixture,
    FlatNet,
    diag_prior,
    fedavg_family,
    fedprox_family,
    iso_prior,
    mixture_priors,
)
from hbfl_pyro.servers import ServerStrategy
from hbfl_pyro.servers.closed_form import FamilyServer, MixtureServer, client_multiplicities


class Recorded(FedHB):
    """FedHB that keeps each round's chosen clients and their replies (copies)."""

    def aggregate(self, chosen, thetas):
        self.rounds = getattr(self, "rounds", []) + [(list(chosen), thetas.clone())]
        return super().aggregate(chosen, thetas)


@pytest.mark.parametrize("participation", ["scaled", "stale"])
@pytest.mark.parametrize("weighting", ["equal", "size"])
@pytest.mark.parametrize("kind", ["iso", "diag"])
def test_strategy_per_client_path_equals_the_trainers_sum_path(participation, weighting, kind):
    net, clients = toy()
    init = FlatNet(net).vector()
    family = iso_prior(init, prox_weight=3.0) if kind == "iso" else diag_prior(init, 2.0)
    fit = Recorded(
        net, clients, family, eps=0.1, participation=participation, weighting=weighting, **OPTS
    )
    fit.run(4)
    assert isinstance(fit.server, FamilyServer) and isinstance(fit.server, ServerStrategy)
    # A server alone, fed the same replies one client at a time, ends at the same q(phi).
    server = FamilyServer(
        family,
        range(len(clients)),
        eps=0.1,
        participation=participation,
        weighting=weighting,
        sizes=[len(y) for _, y in clients],
        fraction=0.5,
        seed=3,
    )
    for r, (chosen, thetas) in enumerate(fit.rounds, start=1):
        assert server.select(r) == chosen  # the strategy's selection is the trainer's
        record = server.aggregate(r, dict(zip(chosen, thetas)))
        assert record["updated"] and record["round"] == r
    for key, value in fit.params.items():
        assert torch.equal(server.family_params[key], value), key
    assert fit.params is fit.server.family_params
    assert sorted(server.stale) == sorted(fit.server.stale)


def test_fedavg_fedprox_and_fedhb_differ_only_by_the_family():
    net, clients = toy()
    init = FlatNet(net).vector()
    families = {
        "fedavg": fedavg_family(init),
        "fedprox": fedprox_family(init, prox_weight=2.0),
        "fedhb": iso_prior(init, prox_weight=3.0),
    }
    fits = {
        name: FedHB(net, clients, fam, eps=0.1, weighting="size", **OPTS)
        for name, fam in families.items()
    }
    for name, fit in fits.items():
        fit.run(2)
        assert type(fit.server) is FamilyServer
        assert fit.server.family is families[name]
        assert (fit.server.participation, fit.server.weighting) == ("scaled", "size")
    # The same strategy, the same clients each round; the families give different q(phi).
    histories = [[r["clients"] for r in fit.history] for fit in fits.values()]
    assert histories[0] == histories[1] == histories[2]
    a, b, c = (fit.global_weights() for fit in fits.values())
    assert not torch.equal(a, c) and not torch.equal(b, c)


def test_the_trainer_checkpoints_the_strategys_state():
    net, clients = toy()
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    fit = FedHB(net, clients, fam, eps=0.1, participation="stale", start="own", **OPTS)
    fit.run(3)
    state = fit.state_dict()
    assert set(state) == {"trainer", "round", "history", "server", "own"}
    server = fit.server.state_dict()
    assert state["server"].keys() == server.keys() == {"mode", "family_params", "stale"}
    assert state["server"]["mode"] == "closed_form"
    for key, value in server["family_params"].items():
        assert torch.equal(state["server"]["family_params"][key], value)
    assert sorted(state["server"]["stale"]) == sorted(fit.server.stale) != []


def test_a_state_of_the_former_layout_still_resumes():
    """Before the strategy, FedHB's state held ``params`` and ``stale`` at the top."""
    net, clients = toy()
    fam = iso_prior(FlatNet(net).vector(), prox_weight=3.0)

    def make():
        return FedHB(net, clients, fam, eps=0.1, participation="stale", **OPTS)

    whole = make()
    whole.run(4)
    first = make()
    first.run(2)
    new = first.state_dict()
    former = {k: v for k, v in new.items() if k != "server"}
    former["params"] = new["server"]["family_params"]
    former["stale"] = new["server"]["stale"]
    resumed = make()
    resumed.load_state_dict(former)
    resumed.run(2)
    assert torch.equal(resumed.global_weights(), whole.global_weights())
    for key, value in whole.params.items():
        assert torch.equal(resumed.params[key], value), key


def test_the_strategy_refuses_another_familys_state():
    net, clients = toy()
    init = FlatNet(net).vector()
    iso = FedHB(net, clients, iso_prior(init), eps=0.1, **OPTS)
    diag = FedHB(net, clients, diag_prior(init), eps=0.1, **OPTS)
    with pytest.raises(ValueError, match="family parameters"):
        diag.server.load_state_dict(iso.server.state_dict())
    with pytest.raises(ValueError, match="not a 'closed_form' server state"):
        iso.server.load_state_dict({"mode": "gradient"})


def test_sum_layout_names_the_familys_summary():
    net, _ = toy()
    init = FlatNet(net).vector()
    d = init.shape[-1]
    iso = FamilyServer(iso_prior(init), range(3), eps=0.1).sum_layout(1)
    diag = FamilyServer(diag_prior(init), range(3), eps=0.1).sum_layout(1)
    assert iso == {"stats/count": (), "stats/sum_m": (d,), "stats/sum_mm": ()}
    assert diag == {"stats/count": (), "stats/sum_m": (d,), "stats/sum_mm": (d,)}


def test_multiplicities_sum_to_n_and_follow_the_weighting():
    like = torch.zeros(1, dtype=torch.float64)
    sizes = [10, 20, 30, 40]
    size = client_multiplicities([1, 3], sizes, 4, "size", like)
    assert size.tolist() == [4 * 20 / 60, 4 * 40 / 60] and float(size.sum()) == 4.0
    assert client_multiplicities([1, 3], sizes, 4, "equal", like).tolist() == [2.0, 2.0]
    # Named clients: sizes are looked up by name.
    named = client_multiplicities(["d", "b"], sizes, 4, "size", like, names=["a", "b", "c", "d"])
    assert named.tolist() == [4 * 40 / 60, 4 * 20 / 60]
    with pytest.raises(ValueError, match="training-set size"):
        FamilyServer(iso_prior(torch.zeros(3)), ["a", "b"], weighting="size")


def test_fewer_clients_than_min_clients_leave_q_phi_as_it_was():
    family = iso_prior(torch.zeros(3, dtype=torch.float64), prox_weight=2.0)
    server = FamilyServer(family, ["a", "b", "c"], eps=0.1, min_clients=2)
    before = {k: v.clone() for k, v in server.family_params.items()}
    with pytest.warns(ClientFailureWarning, match="only 1 client"):
        record = server.aggregate(1, {"b": torch.ones(3, dtype=torch.float64)}, failed=["a"])
    assert record == {"round": 1, "clients": ["b"], "failed": ["a"], "updated": False}
    for key, value in before.items():
        assert torch.equal(server.family_params[key], value), key
    record = server.aggregate(2, {n: torch.ones(3, dtype=torch.float64) for n in "ab"})
    assert record["updated"] and not torch.equal(server.family_params["m0"], before["m0"])


# --------------------------------------------------------------------------------------
# The mixture's server: MixtureServer
# --------------------------------------------------------------------------------------


class RecordedMixture(FedHBMixture):
    """The mixture, keeping each round's chosen clients, replies and responsibilities."""

    def aggregate(self, chosen, thetas, resp=None):
        if resp is None:  # what the clients report: r_i under the current q
            resp = self.responsibilities(thetas)
        self.rounds = getattr(self, "rounds", []) + [(list(chosen), thetas.clone(), resp.clone())]
        return super().aggregate(chosen, thetas, resp)


def _mixture(net, clients, cls=FedHBMixture, **kw):
    fams = mixture_priors(net, 2, seed=1, prox_weight=50.0, pseudo_clients=0.01)
    return cls(net, clients, fams, eps=0.1, warmup_rounds=1, mixing="learned", **kw), fams


@pytest.mark.parametrize("participation", ["scaled", "stale"])
@pytest.mark.parametrize("weighting", ["equal", "size"])
def test_mixture_server_per_client_path_equals_the_trainers(participation, weighting):
    net, clients = toy()
    fit, fams = _mixture(
        net, clients, RecordedMixture, participation=participation, weighting=weighting, **OPTS
    )
    fit.run(4)
    assert isinstance(fit.server, MixtureServer)
    server = MixtureServer(
        fams,
        range(len(clients)),
        alpha0=1.0,
        alpha=fit.init.new_full((2,), 1.0),
        eps=0.1,
        participation=participation,
        weighting=weighting,
        sizes=[len(y) for _, y in clients],
        fraction=0.5,
        seed=3,
    )
    for r, (chosen, thetas, resp) in enumerate(fit.rounds, start=1):
        assert server.select(r) == chosen
        record = server.aggregate(r, {i: (t, q) for i, t, q in zip(chosen, thetas, resp)})
        assert torch.equal(record["counts"], fit.history[r - 1]["counts"])
    for k in range(2):
        for key, value in fit.params[k].items():
            assert torch.equal(server.family_params[k][key], value), (k, key)
    assert torch.equal(server.alpha, fit.alpha) and fit.alpha is fit.server.alpha


def test_a_one_component_mixture_server_is_the_family_server():
    net, clients = toy()
    fam = iso_prior(FlatNet(net).vector(), prox_weight=3.0)
    sizes = [len(y) for _, y in clients]
    one = MixtureServer([fam], range(6), eps=0.1, weighting="size", sizes=sizes)
    family = FamilyServer(
        fam, range(6), eps=0.1, participation="stale", weighting="size", sizes=sizes
    )
    gen = torch.Generator().manual_seed(4)
    for r, chosen in enumerate(([0, 2, 5], [1, 2], [3, 4]), start=1):
        thetas = torch.randn(len(chosen), fam.d, generator=gen, dtype=torch.float64)
        ones = torch.ones(len(chosen), 1, dtype=torch.float64)
        one.aggregate(r, {i: (t, q) for i, t, q in zip(chosen, thetas, ones)})
        family.aggregate(r, dict(zip(chosen, thetas)))
        for key, value in family.family_params.items():
            assert torch.equal(one.family_params[0][key], value), (r, key)


def test_the_mixture_checkpoints_its_servers_state_and_reads_the_former_layout():
    net, clients = toy()
    whole, _ = _mixture(net, clients, **OPTS)
    whole.run(4)
    first, _ = _mixture(net, clients, **OPTS)
    first.run(2)
    state = first.state_dict()
    assert set(state["server"]) == {"mode", "family_params", "alpha", "stale"}
    assert state["server"]["mode"] == "closed_form_mixture" and "params" not in state
    # Before the strategy: params, alpha and stale at the top.
    former = {k: v for k, v in state.items() if k != "server"}
    former.update(
        params=state["server"]["family_params"],
        alpha=state["server"]["alpha"],
        stale=state["server"]["stale"],
    )
    for given in (state, former):
        resumed, _ = _mixture(net, clients, **OPTS)
        resumed.load_state_dict(given)
        resumed.run(2)
        assert torch.equal(resumed.alpha, whole.alpha)
        for k in range(2):
            for key, value in whole.params[k].items():
                assert torch.equal(resumed.params[k][key], value), (k, key)
    with pytest.raises(ValueError, match="closed_form_mixture"):
        resumed.server.load_state_dict({"mode": "closed_form"})
