"""A client that keeps failing stops the fit, naming it, or is dropped by choice and named
in the verdict (issue 14, point 2): its data are never lost quietly."""

import warnings

import eight_schools
import normal_normal
import pytest

from hbfl_pyro import ClientFailureError, FederatedSVI
from hbfl_pyro.failures import MAX_FAILED_ROUNDS
from hbfl_pyro.verdict import verdict_lines

FAST = dict(local_steps=1, grad_particles=2, server_particles=2, seed=0)


def _gradient_fit(**kwargs):
    return FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), **FAST, **kwargs)


def _break(fit, name, monkeypatch):
    def update(message):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fit.clients[name], "update", update)


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ClientFailureWarning of each round
        return fn(*args, **kwargs)


def test_a_client_failing_rounds_in_a_row_stops_the_fit_naming_it(monkeypatch):
    fit = _gradient_fit()
    victim = fit.data.names[2]
    _break(fit, victim, monkeypatch)
    with pytest.raises(ClientFailureError, match=rf"'{victim}'.*on_client_failure='drop'"):
        _quietly(fit.run, 10, progress=False)
    # Stopped at the round that made it K in a row; those rounds are kept in the history.
    assert fit.round == MAX_FAILED_ROUNDS and len(fit.history) == MAX_FAILED_ROUNDS
    assert all(victim in record["failed"] for record in fit.history)


def test_dropping_is_opt_in_and_the_verdict_names_the_dropped(monkeypatch):
    fit = _gradient_fit(on_client_failure="drop")
    victim = fit.data.names[5]
    _break(fit, victim, monkeypatch)
    _quietly(fit.run, 4, progress=False)
    assert fit.round == 4
    assert fit.verdict["dropped_clients"] == [victim]
    line, banner = verdict_lines(fit.verdict)
    assert banner is not None and any(victim in text and "NOT in" in text for text in banner)


def test_a_client_that_recovers_is_not_dropped(monkeypatch):
    fit = _gradient_fit()
    victim = fit.data.names[1]
    original = fit.clients[victim].update
    _break(fit, victim, monkeypatch)
    for _ in range(MAX_FAILED_ROUNDS - 1):  # (run() would end on a client never heard)
        _quietly(fit.step)
    monkeypatch.setattr(fit.clients[victim], "update", original)
    fit.run(1, progress=False)
    assert "dropped_clients" not in fit.verdict


def test_a_client_that_never_succeeds_stops_the_fit_at_the_end(monkeypatch):
    # Sampled clients (fraction 0.5): the victim may take part fewer than K times, but if
    # it never sent a usable reply its data are in no round at all.
    fit = FederatedSVI(
        normal_normal.model, normal_normal.load_data(num_clients=4), fraction=0.5, **FAST
    )
    victim = fit.data.names[0]
    _break(fit, victim, monkeypatch)
    rounds = next(
        r for r in range(1, 20) if sum(victim in fit.server.select(k) for k in range(1, r + 1)) == 1
    )
    with pytest.raises(ClientFailureError, match=rf"'{victim}'.*never sent a usable reply"):
        _quietly(fit.run, rounds, progress=False)


def test_dropping_rules_out_the_second_order_server():
    data = eight_schools.load_data()
    fit = FederatedSVI(eight_schools.noncentered, data, on_client_failure="drop")
    assert fit.server.mode != "second_order"
    assert "on_client_failure='drop'" in fit.server_choice["reason"]
    with pytest.raises(Exception, match="on_client_failure='drop'"):
        FederatedSVI(
            eight_schools.noncentered, data, server="second_order", on_client_failure="drop"
        )
    with pytest.raises(ValueError, match="on_client_failure"):
        FederatedSVI(eight_schools.noncentered, data, on_client_failure="ignore")
