"""Failing clients in deep rounds: the core's semantics (issue 17 point 4).

A chosen client whose local training raises or returns NaN / Inf weights is left out of
the round's aggregate and named in the record (``failed``, ``errors``: the core's keys);
the round goes on with ``min_clients`` good replies; a client failing ``max_failures``
rounds in a row stops the run with :class:`~hbfl_pyro.ClientFailureError`. Vectorised
training is row-wise, so a NaN client never reaches another client's row: the vectorised
engine agrees with the in-process one (clients one after another) with a failing client.
"""

import warnings

import pytest
import torch
from deep_toys import break_client

from hbfl_pyro import ClientFailureError, ClientFailureWarning
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
)
from hbfl_pyro.deep.local import batch_schedule, train_loop, train_vmap
from hbfl_pyro.failures import MAX_FAILED_ROUNDS

SPEC = LocalSpec(epochs=1, batch_size=4, lr=0.1)
SIZES = (20, 9, 14, 5, 12, 17)


def toy(bad=(), seed=0):
    """Six clients in float64; those in ``bad`` hold a NaN feature."""
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for i, n in enumerate(SIZES):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        if i in bad:
            x[0, 1] = float("nan")
        clients.append((x, torch.randint(0, 3, (n,), generator=gen)))
    torch.manual_seed(seed)
    return mlp((4, 6, 3)).double(), clients


def _fedhb(net, clients, **kw):
    return FedHB(net, clients, iso_prior(FlatNet(net).vector(), prox_weight=3.0), eps=0.1, **kw)


def _fedhb_stale(net, clients, **kw):
    fam = diag_prior(FlatNet(net).vector(), prox_weight=2.0)
    return FedHB(net, clients, fam, eps=0.1, participation="stale", start="own", **kw)


def _mixture_cluster(net, clients, **kw):
    fams = mixture_priors(net, 2, seed=1, prox_weight=50.0, pseudo_clients=0.01)
    return FedHBMixture(net, clients, fams, eps=0.1, cluster_rounds=2, hold_rounds=1, **kw)


TRAINERS = {
    "fedavg": lambda net, clients, **kw: FedProx(net, clients, **kw),
    "fedhb": _fedhb,
    "fedhb-stale-own": _fedhb_stale,
    "mixture-cluster": _mixture_cluster,
    "ditto": lambda net, clients, **kw: Ditto(net, clients, lam=0.5, **kw),
    "perfedavg": lambda net, clients, **kw: PerFedAvg(net, clients, variant="hf", **kw),
    "pfedbayes": lambda net, clients, **kw: PFedBayes(net, clients, **kw),
}


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------
# Row-wise training: a NaN client's row stays its own
# --------------------------------------------------------------------------------------


def test_a_nan_client_does_not_poison_the_other_rows_of_vectorised_training():
    net, clients = toy(bad=(2,))
    flat = FlatNet(net)
    start = flat.vector()
    schedules = [batch_schedule(len(y), 4, 2, seed=i) for i, (_, y) in enumerate(clients)]
    pen = None
    rows = train_vmap(flat, start, clients, schedules, SPEC, pen)
    alone = train_loop(flat, start, clients, schedules, SPEC, pen)
    good = [0, 1, 3, 4, 5]
    assert not torch.isfinite(rows[2]).all()
    assert torch.isfinite(rows[good]).all()
    torch.testing.assert_close(rows[good], alone[good], rtol=1e-12, atol=1e-12)
    without = train_vmap(
        flat, start, [clients[i] for i in good], [schedules[i] for i in good], SPEC
    )
    torch.testing.assert_close(rows[good], without, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# A failing client is left out of the round, named in the record
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_a_nan_client_is_left_out_and_engines_agree(name):
    net, clients = toy(bad=(3,))
    fits = {}
    for engine in ("inprocess", "vectorised"):
        fit = TRAINERS[name](net, clients, local=SPEC, engine=engine, seed=1)
        with pytest.warns(ClientFailureWarning, match="client 3 failed.*NaN or Inf"):
            record = fit.step()
        assert record["failed"] == [3] and 3 not in record["clients"]
        assert record["clients"] == [0, 1, 2, 4, 5]
        assert record["errors"] == {3: "its local training returned NaN or Inf weights"}
        quietly(fit.run, 1)
        assert torch.isfinite(fit.global_weights()).all()
        if hasattr(fit, "personal_weights"):
            assert torch.isfinite(fit.personal_weights()[[0, 1, 2, 4, 5]]).all()
        fits[engine] = fit
    torch.testing.assert_close(
        fits["vectorised"].global_weights(),
        fits["inprocess"].global_weights(),
        rtol=1e-9,
        atol=1e-9,
    )


def test_the_aggregate_is_that_of_the_good_clients():
    # FedAvg's average over the clients that replied: as if the failed one was not chosen.
    net, clients = toy(bad=(1,))
    fit = FedProx(net, clients, local=SPEC)
    record = quietly(fit.step)
    assert record["clients"] == [0, 2, 3, 4, 5]

    class Without(FedProx):
        def select(self, server_round):
            return [0, 2, 3, 4, 5]

    reference = Without(net, clients, local=SPEC)
    reference.step()
    assert torch.equal(fit.global_weights(), reference.global_weights())


@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
def test_a_raising_client_is_found_and_left_out(engine):
    net, clients = toy()
    fit = _fedhb(net, clients, local=SPEC, engine=engine)
    break_client(fit, 4)
    with pytest.warns(ClientFailureWarning, match="client 4 failed.*disk on fire"):
        record = fit.step()
    assert record["failed"] == [4] and record["clients"] == [0, 1, 2, 3, 5]
    assert record["errors"] == {4: "RuntimeError: disk on fire"}

    # The other clients trained alone (the fallback) give what the batch gives them.
    class Without(FedHB):
        def select(self, server_round):
            return [0, 1, 2, 3, 5]

    reference = Without(net, clients, fit.family, eps=0.1, local=SPEC, engine=engine)
    reference.step()
    torch.testing.assert_close(
        fit.global_weights(), reference.global_weights(), rtol=1e-12, atol=1e-12
    )


class DittoWithout(Ditto):
    """Ditto whose every round chooses the clients other than 3 (a reference)."""

    def select(self, server_round):
        return [0, 1, 2, 4, 5]


@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
def test_a_client_whose_ditto_personal_step_fails_is_left_out_and_named(engine):
    """Ditto's personal step is the client's work too: a client whose personal model turns
    NaN (its global training being fine) is left out of the round and named, its global
    model is not averaged, and K rounds of it in a row stop the run."""
    net, clients = toy()
    fit = Ditto(net, clients, lam=0.5, local=SPEC, engine=engine, seed=1)
    fit.personal[3] = float("nan")  # e.g. a personal model that diverged
    with pytest.warns(ClientFailureWarning, match="client 3 failed.*NaN or Inf"):
        record = fit.step()
    assert record["failed"] == [3] and record["clients"] == [0, 1, 2, 4, 5]
    assert record["errors"] == {3: "its local training returned NaN or Inf weights"}
    reference = DittoWithout(net, clients, lam=0.5, local=SPEC, engine=engine, seed=1)
    reference.step()
    good = [0, 1, 2, 4, 5]
    torch.testing.assert_close(
        fit.global_weights(), reference.global_weights(), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        fit.personal_weights()[good], reference.personal_weights()[good], rtol=1e-12, atol=1e-12
    )
    assert torch.isfinite(fit.global_weights()).all()
    with pytest.raises(ClientFailureError, match=r"client\(s\) \[3\] failed"):
        quietly(fit.run, MAX_FAILED_ROUNDS)
    assert fit.round == MAX_FAILED_ROUNDS


def test_a_client_whose_ditto_personal_step_raises_is_found_and_left_out():
    net, clients = toy()
    fit = Ditto(net, clients, lam=0.5, local=SPEC, seed=1)
    original = fit.personal_updates

    def personal_updates(server_round, chosen):
        if 3 in chosen:
            raise RuntimeError("personal model lost")
        return original(server_round, chosen)

    fit.personal_updates = personal_updates
    before = fit.personal_weights()[3].clone()
    with pytest.warns(ClientFailureWarning, match="client 3 failed.*personal model lost"):
        record = fit.step()
    assert record["failed"] == [3] and record["clients"] == [0, 1, 2, 4, 5]
    assert record["errors"] == {3: "RuntimeError: personal model lost"}
    assert torch.equal(fit.personal_weights()[3], before)  # kept, not half-updated
    reference = DittoWithout(net, clients, lam=0.5, local=SPEC, seed=1)
    reference.step()
    assert torch.equal(fit.global_weights(), reference.global_weights())
    assert torch.equal(fit.personal_weights(), reference.personal_weights())


def test_when_every_client_raises_the_error_is_the_codes():
    net, clients = toy()
    fit = FedProx(net, clients, local=SPEC)

    def train(*args, **kwargs):
        raise ValueError("a bug in the method")

    fit.train = train
    with pytest.raises(ValueError, match="a bug in the method"):
        fit.step()
    assert fit.round == 0 and fit.history == []


def test_fewer_good_replies_than_min_clients_leaves_the_server_as_it_was():
    net, clients = toy(bad=(0, 5))
    fit = _fedhb(net, clients, local=SPEC, min_clients=5)
    before = fit.global_weights().clone()
    with pytest.warns(ClientFailureWarning, match="only 4 good replies"):
        record = fit.step()
    assert record["updated"] is False and record["failed"] == [0, 5]
    assert torch.equal(fit.global_weights(), before) and fit.round == 1
    ok = _fedhb(net, clients, local=SPEC, min_clients=4)
    assert "updated" not in quietly(ok.step)
    assert not torch.equal(ok.global_weights(), before)


def test_options_are_checked():
    net, clients = toy()
    with pytest.raises(ValueError, match="min_clients must be between 1 and the 3"):
        FedProx(net, clients, fraction=0.5, min_clients=4)
    with pytest.raises(ValueError, match="min_clients"):
        FedProx(net, clients, min_clients=0)
    with pytest.raises(ValueError, match="max_failures"):
        FedProx(net, clients, max_failures=0)


# --------------------------------------------------------------------------------------
# A client that keeps failing stops the run, naming it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_failures", [None, 2])
def test_a_client_failing_rounds_in_a_row_stops_the_run_naming_it(max_failures):
    net, clients = toy(bad=(2,))
    kw = {} if max_failures is None else {"max_failures": max_failures}
    fit = FedProx(net, clients, local=SPEC, **kw)
    limit = max_failures or MAX_FAILED_ROUNDS
    with pytest.raises(ClientFailureError, match=rf"\[2\] failed {limit} rounds in a row"):
        quietly(fit.run, 10)
    # Stopped at the round that made it K in a row; those rounds are in the history.
    assert fit.round == limit and len(fit.history) == limit
    assert all(record["failed"] == [2] for record in fit.history)


def test_a_client_that_recovers_does_not_stop_the_run():
    net, clients = toy()
    fit = FedProx(net, clients, local=SPEC)
    original = break_client(fit, 1)
    quietly(fit.run, MAX_FAILED_ROUNDS - 1)
    fit.train = original
    record = fit.step()
    assert "failed" not in record and 1 in record["clients"]
    break_client(fit, 1)
    quietly(fit.run, MAX_FAILED_ROUNDS - 1)  # a new streak: not yet K in a row
    assert fit.round == 2 * MAX_FAILED_ROUNDS - 1


def test_the_personal_state_of_a_failed_client_is_kept():
    # pFedBayes stores q_i only for clients that replied; the mixture keeps updates of
    # the clustering rounds only for them.
    net, clients = toy(bad=(3,))
    fit = PFedBayes(net, clients, local=SPEC)
    before = fit.personal_weights()[3].clone()
    quietly(fit.run, 2)
    assert torch.equal(fit.personal_weights()[3], before)
    mixture = _mixture_cluster(net, clients, local=SPEC)
    quietly(mixture.step)
    assert sorted(mixture._updates) == [0, 1, 2, 4, 5]
    record = quietly(mixture.step)  # the clustering round
    assert sorted(record["clusters"]) == [0, 1, 2, 4, 5]


def test_pooled_has_no_per_client_replies():
    net, clients = toy()
    fit = Pooled(net, clients, local=SPEC)
    assert not Pooled.PER_CLIENT
    assert "failed" not in fit.step()
