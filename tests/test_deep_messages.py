"""The deep FedHB and mixture clients train from their messages, and ``on_message`` sees
every message as the core's engines deliver it (issue 17 point 4).

- each chosen client gets ``server.message(round, client)`` ("down", before any local
  training) and replies ("up") with ``m_i`` (and the mixture's ``r_i``): exactly the
  rows the server then pools;
- the clients read only the message: a different message trains them elsewhere;
- a hook changes nothing: the run is bit for bit the one without it (both engines);
- failures as in the core: a client whose training raises sends no "up" message, one
  whose reply holds NaN does (the server's check comes after).
"""

import warnings

import pytest
import torch
from deep_toys import OPTS, toy

from hbfl_pyro import ClientFailureWarning
from hbfl_pyro.deep import (
    FedHB,
    FedHBMixture,
    FlatNet,
    LocalSpec,
    diag_prior,
    iso_prior,
    mixture_priors,
)
from hbfl_pyro.seeding import derive_seed


class Log:
    """An ``on_message`` hook keeping every message (by reference, as the core's tests)."""

    def __init__(self):
        self.messages = []

    def __call__(self, direction, client, message):
        self.messages.append((direction, client, message))

    def of_round(self, server_round):
        return [(d, c, m) for d, c, m in self.messages if m["round"] == server_round]


def fedhb(net, clients, **kw):
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    return FedHB(net, clients, fam, eps=0.1, **{**OPTS, **kw})


def mixture(net, clients, **kw):
    fams = mixture_priors(net, 2, seed=1, prox_weight=50.0, pseudo_clients=0.01)
    return FedHBMixture(net, clients, fams, eps=0.1, warmup_rounds=1, **{**OPTS, **kw})


class Pooled(FedHB):
    """FedHB that keeps the rows each round's server update pooled (copies)."""

    def aggregate(self, chosen, thetas):
        self.pooled = getattr(self, "pooled", []) + [(list(chosen), thetas.clone())]
        return super().aggregate(chosen, thetas)


def test_each_client_is_sent_the_servers_message_and_its_reply_is_what_the_server_pools():
    net, clients = toy()
    log = Log()
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    fit = Pooled(net, clients, fam, eps=0.1, on_message=log, **OPTS)
    for r in (1, 2, 3):
        before = {k: v.clone() for k, v in fit.params.items()}
        record = fit.step()
        seen = log.of_round(r)
        chosen = record["clients"]
        # All "down" messages first (before any training), one per chosen client, then "up".
        assert [(d, c) for d, c, _ in seen] == [("down", i) for i in chosen] + [
            ("up", i) for i in chosen
        ]
        for _, i, message in seen[: len(chosen)]:
            assert set(message) == {"round", "mode", "seed", "family_params"}
            assert message["mode"] == "closed_form"
            assert message["seed"] == derive_seed(fit.seed, r, i)
            assert message["family_params"].keys() == before.keys()
            for k, v in before.items():  # the q(phi) the round started from
                assert torch.equal(message["family_params"][k], v)
        pooled_chosen, rows = fit.pooled[-1]
        assert pooled_chosen == chosen
        for j, (_, i, reply) in enumerate(seen[len(chosen) :]):
            assert set(reply) == {"client", "round", "num_examples", "m"}
            assert reply["client"] == i and reply["num_examples"] == len(clients[i][1])
            assert torch.equal(reply["m"], rows[j])


def test_clients_train_from_their_message_alone():
    net, clients = toy()
    shift = 0.25

    class Moved(FedHB):
        """Sends every client a q(phi) whose m0 is moved: the clients must start there."""

        def messages(self, server_round, chosen):
            sent = super().messages(server_round, chosen)
            for m in sent.values():
                m["family_params"]["m0"] = m["family_params"]["m0"] + shift
            return sent

    log = Log()
    still = dict(OPTS, local=LocalSpec(epochs=1, batch_size=4, lr=0.0))  # no steps taken
    fam = iso_prior(FlatNet(net).vector(), prox_weight=2.0)
    fit = Moved(net, clients, fam, eps=0.1, on_message=log, **still)
    m0 = fit.global_weights().clone()
    fit.step()
    ups = [m for d, _, m in log.messages if d == "up"]
    assert ups and all(torch.equal(m["m"], m0 + shift) for m in ups)
    # The same trainer's own messages start the clients at the server's m0.
    log.messages.clear()
    plain = FedHB(net, clients, fam, eps=0.1, on_message=log, **still)
    plain.step()
    assert all(torch.equal(m["m"], m0) for d, _, m in log.messages if d == "up")


def _same_run(a, b):
    assert torch.equal(a.global_weights(), b.global_weights())
    for ra, rb in zip(a.history, b.history):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k == "seconds":
                continue
            va, vb = ra[k], rb[k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k


@pytest.mark.parametrize("engine", ["vectorised", "inprocess"])
@pytest.mark.parametrize("make", [fedhb, mixture], ids=["fedhb", "mixture"])
def test_a_hook_changes_nothing(make, engine):
    net, clients = toy()
    log = Log()
    hooked = make(net, clients, engine=engine, on_message=log)
    plain = make(net, clients, engine=engine)
    hooked.run(3)
    plain.run(3)
    _same_run(hooked, plain)
    assert len(log.messages) == 2 * sum(len(r["clients"]) for r in plain.history)


def test_the_mixtures_reply_carries_its_responsibilities():
    net, clients = toy()
    log = Log()
    fit = mixture(net, clients, on_message=log)
    fit.run(3)
    for record in fit.history:
        seen = log.of_round(record["round"])
        downs = [m for d, _, m in seen if d == "down"]
        ups = [(i, m) for d, i, m in seen if d == "up"]
        assert all(set(m) == {"round", "mode", "seed", "family_params", "alpha"} for m in downs)
        assert [i for i, _ in ups] == record["clients"]
        for j, (_, reply) in enumerate(ups):
            assert set(reply) == {"client", "round", "num_examples", "m", "responsibilities"}
            assert torch.equal(reply["responsibilities"], record["responsibilities"][j])


def test_failing_clients_send_no_reply_and_nan_replies_are_seen_before_the_check():
    net, clients = toy(nan=(4,))  # client 4's data hold a NaN: its reply is NaN

    class Raising(FedHB):
        def local_updates(self, server_round, chosen):
            if 1 in chosen:
                raise RuntimeError("client 1's device is gone")
            return super().local_updates(server_round, chosen)

    log = Log()
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    fit = Raising(net, clients, fam, eps=0.1, on_message=log, **dict(OPTS, fraction=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = fit.step()
    assert any(issubclass(w.category, ClientFailureWarning) for w in caught)
    assert record["failed"] == [1, 4]
    downs = [i for d, i, _ in log.messages if d == "down"]
    ups = {i: m for d, i, m in log.messages if d == "up"}
    assert downs == list(range(6))  # each client is sent its message once
    assert sorted(ups) == [0, 2, 3, 4, 5]  # the raising client sends nothing
    assert not bool(torch.isfinite(ups[4]["m"]).all())


def test_on_message_must_be_callable():
    net, clients = toy()
    with pytest.raises(TypeError, match="on_message must be a callable"):
        fedhb(net, clients, on_message="log")
    with pytest.raises(TypeError, match="on_message must be a callable"):
        mixture(net, clients, on_message=[])
