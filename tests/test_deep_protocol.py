"""The deep trainers share the core's round protocol pieces (issue 17 point 4, first slice).

- **One selection**: :func:`hbfl_pyro.deep.local.select_clients` and
  :meth:`hbfl_pyro.servers.ServerStrategy.select` both draw through
  :func:`hbfl_pyro.servers.base.select_indices`, which chooses exactly what each of them
  chose before (their former code is kept here as the reference).
- **One round loop**: :meth:`FederatedTrainer.step` runs select, local updates, aggregate
  and record as hooks; every trainer (FedHB, the mixture, FedProx, Pooled, Ditto,
  Per-FedAvg, pFedBayes) runs through it.
- **state_dict / load_state_dict**: a run stopped after any round and resumed in a fresh
  trainer equals the uninterrupted run bit for bit (weights, personal models, history).

The former engine names ("loop", "vmap") are checked in tests/test_deprecated_paths.py.
"""

from types import SimpleNamespace

import pytest
import torch

from hbfl_pyro.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hbfl_pyro.deep import (
    Ditto,
    FedHB,
    FedHBMixture,
    FedProx,
    FlatNet,
    LocalSpec,
    PerFedAvg,
    PFedBayes,
    Pooled,
    diag_prior,
    iso_prior,
    mixture_priors,
    mlp,
    select_clients,
)
from hbfl_pyro.seeding import derive_seed
from hbfl_pyro.servers import ServerStrategy
from hbfl_pyro.servers.base import select_indices
from hbfl_pyro.servers.closed_form import client_multiplicities


def former_deep_selection(num_clients, fraction, seed, server_round):
    """``deep.local.select_clients`` before the shared helper (verbatim)."""
    k = max(1, int(round(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "select"))
    return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())


def former_strategy_selection(names, fraction, seed, server_round):
    """``ServerStrategy.select`` before the shared helper (verbatim)."""
    n = len(names)
    k = max(1, int(round(fraction * n)))
    if k == n:
        return list(names)
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "select"))
    chosen = torch.randperm(n, generator=gen)[:k].sort().values
    return [names[i] for i in chosen]


GRID = [
    (n, fraction, seed, r)
    for n in (1, 2, 5, 10, 37, 100)
    for fraction in (0.01, 0.1, 0.3, 0.5, 0.99, 1.0)
    for seed in (0, 7)
    for r in (1, 2, 13)
]


def test_one_selection_chooses_what_both_chose_before():
    for n, fraction, seed, r in GRID:
        before = former_deep_selection(n, fraction, seed, r)
        assert select_clients(n, fraction, seed, r) == before
        assert select_indices(n, fraction, seed, r) == before
        names = [f"c{i:03d}" for i in range(n)]
        strategy = SimpleNamespace(client_names=names, num_clients=n, fraction=fraction, seed=seed)
        chosen = ServerStrategy.select(strategy, r)  # type: ignore[arg-type]
        assert chosen == former_strategy_selection(names, fraction, seed, r)
        assert chosen == [names[i] for i in before]  # the core and deep see the same clients
    # Tags other than round numbers (the deep trainers' fine-tuning tags) seed alike.
    assert select_indices(10, 0.3, 4, "tag") == former_deep_selection(10, 0.3, 4, "tag")
    with pytest.raises(ValueError, match="fraction"):
        select_clients(10, 0.0, 0, 1)


# --------------------------------------------------------------------------------------
# The round loop's hooks
# --------------------------------------------------------------------------------------


def toy(sizes=(20, 9, 14, 5, 12, 17), seed=0):
    gen = torch.Generator().manual_seed(seed)
    clients = [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes
    ]
    torch.manual_seed(seed)
    return mlp((4, 6, 3)), clients


def test_the_round_loop_runs_the_hooks_in_order():
    net, clients = toy()
    calls = []

    class Traced(FedProx):
        def select(self, server_round):
            calls.append(("select", server_round))
            return [0, 2]

        def local_updates(self, server_round, chosen):
            calls.append(("local_updates", server_round, chosen))
            return super().local_updates(server_round, chosen)

        def aggregate_round(self, server_round, chosen, replies):
            calls.append(("aggregate_round", server_round, chosen, tuple(replies.shape)))
            return {"note": server_round, **super().aggregate_round(server_round, chosen, replies)}

    fit = Traced(net, clients, local=LocalSpec(batch_size=8))
    record = fit.step()
    d = fit.net.d
    assert calls == [
        ("select", 1),
        ("local_updates", 1, [0, 2]),
        ("aggregate_round", 1, [0, 2], (2, d)),
    ]
    assert list(record) == ["round", "clients", "note", "seconds"]
    assert record["clients"] == [0, 2] and fit.round == 1 and fit.history == [record]


# --------------------------------------------------------------------------------------
# state_dict / load_state_dict: resume == uninterrupted
# --------------------------------------------------------------------------------------


def _fedhb(net, clients, **kw):
    return FedHB(net, clients, iso_prior(FlatNet(net).vector(), prox_weight=3.0), eps=0.1, **kw)


def _fedhb_stale_own(net, clients, **kw):
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    return FedHB(net, clients, fam, eps=0.1, participation="stale", start="own", **kw)


def _mixture_warmup(net, clients, **kw):
    fams = mixture_priors(net, 2, seed=1, prox_weight=50.0, pseudo_clients=0.01)
    return FedHBMixture(net, clients, fams, eps=0.1, warmup_rounds=1, mixing="learned", **kw)


def _mixture_cluster(net, clients, **kw):
    fams = mixture_priors(net, 2, seed=1, prox_weight=50.0, pseudo_clients=0.01)
    return FedHBMixture(net, clients, fams, eps=0.1, cluster_rounds=2, hold_rounds=1, **kw)


TRAINERS = {
    "fedavg": lambda net, clients, **kw: FedProx(net, clients, **kw),
    "fedprox": lambda net, clients, **kw: FedProx(net, clients, mu=0.3, **kw),
    "fedhb": _fedhb,
    "fedhb-stale-own": _fedhb_stale_own,
    "mixture-warmup": _mixture_warmup,
    "mixture-cluster": _mixture_cluster,
    "pooled": lambda net, clients, **kw: Pooled(net, clients, **kw),
    "ditto": lambda net, clients, **kw: Ditto(net, clients, lam=0.5, **kw),
    "perfedavg": lambda net, clients, **kw: PerFedAvg(net, clients, variant="hf", **kw),
    "pfedbayes": lambda net, clients, **kw: PFedBayes(net, clients, **kw),
}


def same(a, b) -> bool:
    """Bit-for-bit equality of nested records (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_resumed_run_equals_the_uninterrupted_one(name):
    net, clients = toy()
    make = TRAINERS[name]
    opts = dict(fraction=0.5, local=LocalSpec(epochs=1, batch_size=4, lr=0.1), seed=3)
    rounds = 5
    whole = make(net, clients, **opts)
    whole.run(rounds)
    for stop in (1, 2, 3):
        first = make(net, clients, **opts)
        first.run(stop)
        state = first.state_dict()
        assert state["round"] == stop and state["trainer"] == type(first).__name__
        first.run(1)  # the snapshot is a copy: running on does not change it
        resumed = make(net, clients, **opts)
        resumed.load_state_dict(state)
        resumed.run(rounds - stop)
        assert resumed.round == rounds
        assert same(resumed.global_weights(), whole.global_weights()), stop
        if hasattr(whole, "personal_weights"):
            assert same(resumed.personal_weights(), whole.personal_weights()), stop
        assert same(without_seconds(resumed.history), without_seconds(whole.history)), stop
        for key in state:
            if key not in ("trainer", "round", "history"):
                assert same(resumed.state_dict()[key], whole.state_dict()[key]), (stop, key)
    # Personalisation after a resumed run is the same too.
    assert same(resumed.finetune(clients[:2], 1), whole.finetune(clients[:2], 1))


def test_load_state_dict_refuses_another_trainers_state():
    net, clients = toy()
    fedhb = _fedhb(net, clients)
    fedhb.run(1)
    with pytest.raises(ValueError, match="not a FedProx state"):
        FedProx(net, clients).load_state_dict(fedhb.state_dict())
    state = fedhb.state_dict()
    del state["own"]
    with pytest.raises(ValueError, match="expected"):
        _fedhb(net, clients).load_state_dict(state)


def test_the_mixtures_gate_is_part_of_its_state(tmp_path):
    net, clients = toy()
    opts = dict(fraction=0.5, local=LocalSpec(epochs=1, batch_size=4, lr=0.1), seed=3)
    fit = _mixture_warmup(net, clients, **opts)
    fit.run(3)
    before_gate = fit.state_dict()
    assert before_gate["gate"] is None
    torch.manual_seed(5)
    fit.train_gate(mlp((4, 5, 2)), 2)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(6))
    path = tmp_path / "mixture.pt"
    fit.checkpoint(path)
    # The gate's architecture is code: without it the state is refused, and nothing changes.
    resumed = _mixture_warmup(net, clients, **opts)
    with pytest.raises(ValueError, match="gate_net"):
        resumed.resume(path)
    assert resumed.round == 0 and resumed.gate is None and resumed.history == []
    with pytest.raises(ValueError, match="layout"):
        resumed.resume(path, gate_net=mlp((4, 6, 2)))
    assert resumed.round == 0 and resumed.gate is None
    # Given it (other initial weights: only its shapes are used), the resumed mixture
    # predicts as the one that wrote the file, bit for bit, and its state is the same.
    torch.manual_seed(99)
    resumed.resume(path, gate_net=mlp((4, 5, 2)))
    assert resumed.round == 3
    assert torch.equal(resumed.gate_weights, fit.gate_weights)
    assert torch.equal(resumed.gate_probs(x), fit.gate_probs(x))
    assert torch.equal(resumed.predict_proba(x), fit.predict_proba(x))
    assert same(resumed.state_dict(), fit.state_dict())
    # The runs go on alike, and a trainer with a gate reuses its own architecture.
    resumed.run(2)
    fit.run(2)
    assert same(without_seconds(resumed.history), without_seconds(fit.history))
    again = _mixture_warmup(net, clients, **opts)
    again.resume(path, gate_net=mlp((4, 5, 2)))
    again.load_state_dict(resumed.state_dict())
    assert torch.equal(again.predict_proba(x), fit.predict_proba(x))
    # A state from before the gate leaves none, whatever the trainer had.
    again.load_state_dict(before_gate)
    assert again.gate is None and again.gate_weights is None and again.round == 3
    three = _mixture_warmup(net, clients, **opts)
    three.run(3)
    with pytest.warns(UserWarning, match="no gating network"):
        assert torch.equal(again.predict_proba(x), three.predict_proba(x, gate=False))


# --------------------------------------------------------------------------------------
# Checkpoint files: save_checkpoint / load_checkpoint with the trainer's fingerprint
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_a_run_resumed_from_a_checkpoint_file_equals_the_uninterrupted_one(name, tmp_path):
    net, clients = toy()
    make = TRAINERS[name]
    opts = dict(fraction=0.5, local=LocalSpec(epochs=1, batch_size=4, lr=0.1), seed=3)
    whole = make(net, clients, **opts)
    whole.run(5)
    first = make(net, clients, **opts)
    first.run(2)
    path = tmp_path / "deep.pt"
    save_checkpoint(first.state_dict(), path, first.fingerprint())
    resumed = make(net, clients, **opts)  # a fresh trainer
    resumed.load_state_dict(load_checkpoint(path, resumed.fingerprint()))
    assert resumed.round == 2
    resumed.run(3)
    assert same(resumed.global_weights(), whole.global_weights())
    if hasattr(whole, "personal_weights"):
        assert same(resumed.personal_weights(), whole.personal_weights())
    assert same(without_seconds(resumed.history), without_seconds(whole.history))
    # The trainer's own spelling: checkpoint(path) / resume(path).
    first.checkpoint(path)
    again = make(net, clients, **opts)
    again.resume(path)
    again.run(3)
    assert same(again.global_weights(), whole.global_weights())


def test_a_checkpoint_file_is_refused_by_another_trainer_network_or_clients(tmp_path):
    net, clients = toy()
    opts = dict(local=LocalSpec(epochs=1, batch_size=4, lr=0.1), seed=3)
    fit = _fedhb(net, clients, **opts)
    fit.run(1)
    path = tmp_path / "fedhb.pt"
    fit.checkpoint(path)

    def refused(other, match):
        with pytest.raises(CheckpointError, match=match):
            other.resume(path)
        assert other.round == 0 and other.history == []  # nothing changed

    refused(FedProx(net, clients, **opts), r"trainer: 'FedHB' in the checkpoint, 'FedProx' here")
    torch.manual_seed(0)
    wider = mlp((4, 7, 3))
    refused(_fedhb(wider, clients, **opts), r"network\['1.weight'\]: \[6, 4\] in the checkpoint")
    refused(_fedhb(net, clients[:5], **opts), r"clients: 6 in the checkpoint, 5 here")
    refused(_fedhb(net, clients, **{**opts, "seed": 4}), r"seed: 3 in the checkpoint, 4 here")
    stale = FedHB(
        net, clients, fit.family, eps=0.1, participation="stale", **opts
    )  # another setting of the same trainer
    refused(stale, r"settings\['participation'\]: 'scaled' in the checkpoint, 'stale' here")
    # The same trainer, network and clients resume it (another engine too).
    same_run = _fedhb(net, clients, engine="inprocess", **opts)
    same_run.resume(path)
    assert same_run.round == 1


# --------------------------------------------------------------------------------------
# One participation: hbfl_pyro.participation for the core's server and the deep trainers
# --------------------------------------------------------------------------------------


def test_the_core_and_deep_trainers_share_participation():
    import hbfl_pyro.server as core_server
    import hbfl_pyro.servers.closed_form as closed_form
    from hbfl_pyro import participation

    # Deep FedHB pools and weighs through its server strategy, which uses the same module.
    assert closed_form.pool_replies is participation.pool_replies
    assert closed_form.scale_factor is participation.scale_factor
    assert core_server.pool_replies is participation.pool_replies
    assert core_server.scale_factor is participation.scale_factor
    net, clients = toy()
    family = iso_prior(FlatNet(net).vector())
    with pytest.raises(ValueError, match="participation must be 'scaled' or 'stale'"):
        FedHB(net, clients, family, participation="fresh")
    # Stale: the pool holds each client's latest reply (its m_i), every client heard so far.
    fit = FedHB(net, clients, family, participation="stale", fraction=0.5, eps=0.1, seed=1)
    seen = {}
    for record in fit.run(4):
        seen.update(dict.fromkeys(record["clients"]))
    assert sorted(fit.server.stale) == sorted(seen)
    # Scaled: each round's equal weights are N / |S| (the core's factor), summing to N.
    weights = client_multiplicities([0, 2, 5], fit.sizes, 6, "equal", fit.init)
    assert weights.tolist() == [participation.scale_factor(6, 3)] * 3 == [2.0] * 3
