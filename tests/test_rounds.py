"""The one round loop (hbfl_pyro.rounds, issue 17): the core's FederatedSVI and the deep
trainers run each round through federated_round, the deep trainers' local work through a
DeepEngine; real fits throughout."""

import warnings

import normal_normal
import pytest
import torch
from deep_toys import OPTS, break_client, toy
from tree_asserts import assert_same

from hbfl_pyro import ClientFailureError, ClientFailureWarning, FederatedSVI
from hbfl_pyro.deep import FedHB, FedProx, FlatNet, iso_prior
from hbfl_pyro.engines.deep import DeepEngine
from hbfl_pyro.failures import MAX_FAILED_ROUNDS, FailureRule
from hbfl_pyro.rounds import federated_round

FAST = dict(local_steps=1, grad_particles=2, server_particles=2, seed=0)


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        return fn(*args, **kwargs)


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


# --------------------------------------------------------------------------------------
# The loop is what step() runs
# --------------------------------------------------------------------------------------


def test_a_deep_round_is_the_loop_with_the_trainers_parts():
    net, clients = toy()
    stepped, looped = FedProx(net, clients, **OPTS), FedProx(net, clients, **OPTS)
    for _ in range(2):
        stepped.step()
        federated_round(
            looped,
            looped.select,
            lambda server_round, chosen: dict.fromkeys(chosen),  # FedProx sends nothing
            DeepEngine(looped),
            lambda server_round, chosen, replies, failures: {
                "round": server_round,
                "clients": chosen,
                **looped.aggregate_round(server_round, chosen, replies),
            },
            FailureRule(),
        )
    assert looped.round == stepped.round == 2
    assert_same(without_seconds(looped.history), without_seconds(stepped.history))
    assert torch.equal(looped.global_weights(), stepped.global_weights())


def test_a_core_round_is_the_loop_with_the_fits_parts():
    def fit():
        return FederatedSVI(normal_normal.model, normal_normal.load_data(num_clients=4), **FAST)

    stepped, looped = fit(), fit()
    stepped.step()
    record = federated_round(
        looped,
        looped.server.select,
        lambda server_round, chosen: {c: looped.server.message(server_round, c) for c in chosen},
        looped.engine,
        lambda server_round, chosen, replies, failures: looped.server.aggregate(
            server_round, replies, list(failures)
        ),
        FailureRule(),
    )
    # The same round, less the stopping rule's status (step's on_record adds it).
    expected = {k: v for k, v in stepped.history[0].items() if k != "convergence"}
    assert without_seconds([record]) == without_seconds([expected])
    assert_same(looped.server.state_dict(), stepped.server.state_dict())


# --------------------------------------------------------------------------------------
# The deep engine: batched replies, failures found and left out
# --------------------------------------------------------------------------------------


def test_the_deep_engine_returns_the_good_rows_and_each_failure_sorted_by_client():
    net, clients = toy(nan=(1,))  # client 1's training returns NaN; client 4 raises
    fit = FedProx(net, clients, **dict(OPTS, fraction=1.0))
    reference = fit.local_updates(1, [0, 2, 3, 5])  # the good clients alone
    break_client(fit, 4)
    with pytest.warns(ClientFailureWarning) as caught:
        replies, failures = DeepEngine(fit).run_round(dict.fromkeys([4, 0, 1, 2, 3, 5]))
    assert list(failures) == [1, 4]
    assert failures[4] == "RuntimeError: disk on fire"
    assert failures[1] == "its local training returned NaN or Inf weights"
    assert [str(w.message) for w in caught] == [
        f"round 1: client {i} failed ({failures[i]}); it is left out of this round" for i in (1, 4)
    ]
    # Row-wise training: the good clients' rows (in the messages' order) are theirs alone.
    torch.testing.assert_close(replies, reference, rtol=1e-12, atol=1e-12)


def test_the_deep_engine_delivers_every_message_before_training_and_keeps_none_after():
    net, clients = toy()
    log = []
    fam = iso_prior(FlatNet(net).vector(), prox_weight=3.0)
    fit = FedHB(net, clients, fam, eps=0.1, on_message=lambda *m: log.append(m), **OPTS)
    engine = fit.round_engine
    original = fit.local_updates

    def local_updates(server_round, chosen):
        # Every down message is out before any client trains, and the clients read them.
        assert [d for d, _, _ in log] == ["down"] * len(chosen)
        assert engine.sent[0] == server_round and sorted(engine.sent[1]) == sorted(chosen)
        return original(server_round, chosen)

    fit.local_updates = local_updates
    record = fit.step()
    assert engine.sent == (0, {})  # each message holds a copy of q(phi): not kept
    assert [i for d, i, _ in log if d == "up"] == record["clients"]


# --------------------------------------------------------------------------------------
# The failure rule: the core judges every round, the deep trainers rounds with a failure
# --------------------------------------------------------------------------------------


def test_a_deep_run_continued_after_the_error_goes_on_until_a_client_fails_again():
    net, clients = toy()
    fit = FedProx(net, clients, **OPTS)  # half the clients a round
    break_client(fit, 2)
    stopped = []
    for _ in range(12):
        try:
            quietly(fit.step)
        except ClientFailureError:
            stopped.append(fit.round)
    assert stopped, "client 2 should have failed often enough"
    # Each stop came in a round where client 2 failed; rounds without it went on.
    assert all(2 in fit.history[r - 1].get("failed", []) for r in stopped)
    assert any("failed" not in record for record in fit.history[stopped[0] :])


def test_a_core_fit_continued_after_the_error_stops_at_its_next_round(monkeypatch):
    fit = FederatedSVI(
        normal_normal.model, normal_normal.load_data(num_clients=8), fraction=0.5, **FAST
    )
    # A client whose third round is round K and who is not chosen in round K + 1.
    taken = {name: 0 for name in fit.data.names}
    victim = None
    for k in range(1, 40):
        for name in fit.server.select(k):
            taken[name] += 1
            if taken[name] == MAX_FAILED_ROUNDS and name not in fit.server.select(k + 1):
                victim = name
        if victim is not None:
            break
    assert victim is not None
    original = fit.clients[victim].update

    def update(message):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fit.clients[victim], "update", update)
    for _ in range(k - 1):
        quietly(fit.step)
    with pytest.raises(ClientFailureError, match=f"failed {MAX_FAILED_ROUNDS} rounds in a row"):
        quietly(fit.step)
    monkeypatch.setattr(fit.clients[victim], "update", original)
    # Round K + 1: no client fails (the victim is not chosen), and the fit stops again.
    with pytest.raises(ClientFailureError, match=rf"round {k + 1}: .*'{victim}'"):
        fit.step()
    assert fit.history[-1]["failed"] == [] and len(fit.history) == k + 1
