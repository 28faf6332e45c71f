"""Checkpoint and resume (evaluation.md §D): a restarted run continues exactly.

Every random choice is seeded by ``(seed, round, client)`` and all state is explicit, so
running R rounds in one go, or R/2 rounds, a checkpoint, a brand-new ``FederatedSVI``
built with the same arguments, a resume and R/2 more rounds, must give bit-identical
global and local parameters, optimiser states and ELBO history.
"""

import copy

import eight_schools
import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI

ROUNDS = 4

CASES = {
    # gradient mode with client sampling (half the schools per round): the sampled set
    # and every client's noise must continue from the same place
    "gradient": (
        eight_schools.noncentered,
        eight_schools.load_data,
        dict(fraction=0.5, grad_particles=2, server_particles=2),
    ),
    # closed form with stale summaries of the clients not sampled
    "closed_form": (
        normal_normal.model,
        lambda: normal_normal.load_data(num_clients=5),
        dict(fraction=0.6),
    ),
}


def _make(mode, seed=11):
    model, load, options = CASES[mode]
    fit = FederatedSVI(model, load(), local_steps=2, seed=seed, **options)
    assert fit.server.mode == mode
    return fit


def _assert_same(a, b, path="state"):
    """Recursive exact equality; tensors with ``torch.equal``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _history(fit):
    """The history without wall-clock times."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in fit.history]


def _assert_runs_equal(a, b):
    # global factor (parameters, optimiser, scheduler, stale summaries)
    _assert_same(a.server.state_dict(), b.server.state_dict(), "server")
    if a.family is None:
        for (n, p), (m, q) in zip(
            a.server.global_guide.named_parameters(), b.server.global_guide.named_parameters()
        ):
            assert n == m and torch.equal(p, q), n
    else:
        _assert_same(a.server.family_params, b.server.family_params, "family_params")
    # every client's local factor and its optimiser
    assert list(a.clients) == list(b.clients)
    for name in a.clients:
        _assert_same(a.clients[name].state_dict(), b.clients[name].state_dict(), name)
        for (n, p), (m, q) in zip(
            a.clients[name].local_guide.named_parameters(),
            b.clients[name].local_guide.named_parameters(),
        ):
            assert n == m and torch.equal(p, q), (name, n)
    # the history, ELBO values exactly
    assert [r["elbo"] for r in a.history] == [r["elbo"] for r in b.history]
    _assert_same(_history(a), _history(b), "history")
    assert a.round == b.round


@pytest.mark.parametrize("mode", sorted(CASES))
def test_resumed_run_equals_the_uninterrupted_run(mode, tmp_path):
    uninterrupted = _make(mode)
    uninterrupted.run(ROUNDS, progress=False)

    first = _make(mode)
    first.run(ROUNDS // 2, progress=False)
    path = tmp_path / "checkpoint.pt"
    first.checkpoint(path)
    del first

    resumed = _make(mode)
    resumed.resume(path)
    assert resumed.round == ROUNDS // 2 and len(resumed.history) == ROUNDS // 2
    resumed.run(ROUNDS - ROUNDS // 2, progress=False)

    _assert_runs_equal(uninterrupted, resumed)
    assert [r["round"] for r in resumed.history] == list(range(1, ROUNDS + 1))
    if mode == "gradient":
        # client sampling mattered: not every school took part in every round
        assert any(len(r["clients"]) < len(resumed.clients) for r in resumed.history)
        assert len({tuple(r["clients"]) for r in resumed.history}) > 1


@pytest.mark.parametrize("mode", sorted(CASES))
def test_checkpointing_does_not_perturb_the_run(mode, tmp_path):
    reference = _make(mode)
    reference.run(ROUNDS, progress=False)
    fit = _make(mode)
    fit.run(ROUNDS // 2, progress=False)
    fit.checkpoint(tmp_path / "a.pt")
    fit.state_dict()
    fit.run(ROUNDS - ROUNDS // 2, progress=False)
    _assert_runs_equal(reference, fit)


@pytest.mark.parametrize("mode", sorted(CASES))
def test_resume_with_another_seed_is_refused_and_changes_nothing(mode, tmp_path):
    fit = _make(mode)
    fit.run(1, progress=False)
    path = tmp_path / "checkpoint.pt"
    fit.checkpoint(path)
    other = _make(mode, seed=12)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="seed"):
        other.resume(path)
    _assert_same(other.state_dict(), before)
    assert other.round == 0 and other.history == []


_PLAIN = (bool, int, float, str, type(None))


def _walk(obj, path="state"):
    """Every leaf must be a tensor or a plain value, inside dicts, lists and tuples."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, (str, int)), f"{path}: key {key!r}"
            yield from _walk(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    else:
        assert isinstance(obj, (torch.Tensor, *_PLAIN)), f"{path}: {type(obj).__name__}"
        yield path, obj


@pytest.mark.parametrize("mode", sorted(CASES))
def test_state_is_plain_containers_and_tensors(mode, tmp_path):
    fit = _make(mode)
    fit.run(2, progress=False)
    state = fit.state_dict()
    assert type(state) is dict
    assert {"round", "seed", "server", "clients", "history"} <= set(state)
    assert sorted(state["clients"]) == sorted(fit.clients)
    leaves = list(_walk(state))
    assert any(isinstance(v, torch.Tensor) for _, v in leaves)
    # so the checkpoint loads without unpickling arbitrary objects
    path = tmp_path / "checkpoint.pt"
    fit.checkpoint(path)
    loaded = torch.load(path, weights_only=True)
    _assert_same(loaded, state)
    # and resuming from the safely loaded state is the same as resuming from the file
    a, b = _make(mode), _make(mode)
    a.load_state_dict(loaded)
    b.resume(path)
    a.run(1, progress=False)
    b.run(1, progress=False)
    _assert_runs_equal(a, b)


@pytest.mark.parametrize("mode", sorted(CASES))
def test_in_memory_state_is_a_snapshot(mode):
    fit = _make(mode)
    fit.run(2, progress=False)
    state = fit.state_dict()
    frozen = copy.deepcopy(state)
    reference = _make(mode)
    reference.load_state_dict(copy.deepcopy(frozen))
    # two runs resumed from the same in-memory state must not share anything
    a, b = _make(mode), _make(mode)
    a.load_state_dict(state)
    b.load_state_dict(state)
    fit.run(2, progress=False)
    a.run(2, progress=False)
    b.run(2, progress=False)
    reference.run(2, progress=False)
    failures = []
    for label, check in [
        ("the state_dict changed as its run went on", lambda: _assert_same(state, frozen)),
        ("run a differs from the reference", lambda: _assert_runs_equal(a, reference)),
        ("run b differs from the reference", lambda: _assert_runs_equal(b, reference)),
    ]:
        try:
            check()
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, failures


def test_incompatible_checkpoint_is_refused_and_changes_nothing(tmp_path):
    data = normal_normal.load_data(num_clients=5)
    closed = FederatedSVI(normal_normal.model, data, local_steps=2, seed=11)
    closed.run(1, progress=False)
    path = tmp_path / "closed.pt"
    closed.checkpoint(path)
    gradient = FederatedSVI(normal_normal.model, data, local_steps=2, seed=11, server="gradient")
    before = copy.deepcopy(gradient.state_dict())
    with pytest.raises(ValueError, match="closed_form|gradient|mode"):
        gradient.resume(path)
    _assert_same(gradient.state_dict(), before)
    assert gradient.round == 0
