"""Privacy audit (evaluation.md §D): no message that leaves a client carries its data.

Every message between the server and a client passes through the engine's delivery point,
so ``FederatedSVI(on_message=hook)`` sees all traffic. The audit records every message of
a few rounds, in both server modes, and checks each message a client sends ("up"):

(i)   it holds only the allowed keys, with metadata of the expected types;
(ii)  every tensor has a shape fixed by the model, never by the client's data: the
      gradient mode's tensors have exactly the keys and shapes of the server's global
      guide parameters; the closed-form mode's summaries have exactly the keys and shapes
      the family computes from a data-free input; and the shapes agree across clients
      with different numbers of observations;
(iv)  no tensor has a dimension equal to the client's number of observations, except
      where that dimension is also the corresponding dimension of the data-free
      reference shape (the parameter's own dimension, which the data cannot change);
(iii) no number in it equals a value of the client's data, exactly or within 1e-9.

Messages the server sends ("down") may only hold the global factor and round metadata,
and no value of any client's data. A message, once sent, must also never change: a reply
that shares memory with its client's parameters would keep leaking them.

The test data are chosen so that no data value equals a trivial constant the protocol
sends (0, 1, the prior scale 10, the autoguide's initial scale 0.1).
"""

import copy

import eight_schools
import normal_normal
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from hbfl_pyro import FederatedData, FederatedSVI, num_clients

UP_KEYS = {
    "gradient": {"client", "round", "num_examples", "elbo", "grads"},
    "closed_form": {"client", "round", "num_examples", "elbo", "stats"},
}
DOWN_KEYS = {
    "gradient": {"round", "mode", "seed", "global_params"},
    "closed_form": {"round", "mode", "seed", "family_params"},
}
TOL = 1e-9

D = 3  # dimension of the vector model below; one of its clients has exactly D observations


def vector_model(data):
    """A Normal-Normal hierarchy in D dimensions; ``y`` has shape ``(n, D)`` per client."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 10.0).to_event(1))
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0).to_event(1))
        with pyro.plate("obs", data["y"].shape[-2], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=data["y"])


def _vector_data():
    gen = torch.Generator().manual_seed(7)
    return {f"v{n}": {"y": 2.0 + torch.randn(n, D, generator=gen)} for n in (D, 5, 8)}


CASES = {
    # gradient mode: mu and tau enter the likelihood; one observation per school
    "eight_schools-gradient": (eight_schools.noncentered, eight_schools.load_data, "auto", 0.5),
    # closed form: ragged clients (3 to 30 observations)
    "normal_normal-closed_form": (
        normal_normal.model,
        lambda: normal_normal.load_data(num_clients=5),
        "auto",
        1.0,
    ),
    # the same ragged clients in gradient mode
    "normal_normal-gradient": (
        normal_normal.model,
        lambda: normal_normal.load_data(num_clients=5),
        "gradient",
        1.0,
    ),
    # parameters of dimension D, a client with D observations: (iv) must tell them apart
    "vector-closed_form": (vector_model, _vector_data, "auto", 1.0),
    "vector-gradient": (vector_model, _vector_data, "gradient", 1.0),
}
EXPECTED_MODE = {name: name.rsplit("-", 1)[1] for name in CASES}


# ---------------------------------------------------------------------- the audit helpers
class MessageLog:
    """An ``on_message`` hook keeping every message, as sent and as a deep copy."""

    def __init__(self):
        self.sent = []  # (direction, client, message) by reference
        self.copies = []  # deep copies taken at delivery time

    def __call__(self, direction, client, message):
        self.sent.append((direction, client, message))
        self.copies.append((direction, client, copy.deepcopy(message)))

    def up(self):
        return [(c, m) for d, c, m in self.copies if d == "up"]

    def down(self):
        return [(c, m) for d, c, m in self.copies if d == "down"]


def leaves(obj, path="message"):
    """Every leaf of a message as ``(path, value)``; a leaf of any other type fails."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), f"{path}: non-string key {key!r}"
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (bool, int, float, str, torch.Tensor)):
        yield path, obj
    else:
        raise AssertionError(f"{path}: unexpected {type(obj).__name__} in a message")


def numbers(message):
    """All floating-point numbers of a message (tensor elements and floats), as float64."""
    parts = [torch.zeros(0, dtype=torch.float64)]
    for _, value in leaves(message):
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().reshape(-1).to(torch.float64))
        elif isinstance(value, float):
            parts.append(torch.tensor([value], dtype=torch.float64))
    return torch.cat(parts)


def data_values(client_data):
    """Every value of a client's raw data, flattened to float64."""
    return torch.cat(
        [torch.as_tensor(v).detach().reshape(-1).to(torch.float64) for v in client_data.values()]
    )


def data_tensors(fit, client):
    return list(fit.data[fit.data.names.index(client)].values())


def assert_no_data_values(message, values, where):
    """(iii): no number of ``message`` equals, or lies within TOL of, any of ``values``."""
    sent = numbers(message)
    assert sent.numel() > 0
    exact = sent[:, None] == values[None, :]
    assert not exact.any(), f"{where}: sends the data value(s) {values[exact.any(0)].tolist()}"
    close = torch.isclose(sent[:, None], values[None, :], rtol=TOL, atol=TOL)
    assert not close.any(), f"{where}: sends number(s) within {TOL} of data values"


def assert_no_shared_memory(message, tensors, where):
    """No tensor of a message is, or views, the memory of a data tensor."""
    for path, value in leaves(message):
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            for t in tensors:
                if t.numel() > 0:
                    same = value.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                    assert not same, f"{where}: {path} shares memory with the client's data"


def reference_shapes(fit):
    """The up-message tensor shapes as fixed by the model alone (no client data).

    Gradient mode: the server's global guide parameters. Closed form: the family's
    summary of a zero mean and covariance of the local site's dimension, read off the
    model run on the data-free placeholder the server holds.
    """
    if fit.family is None:
        return {k: tuple(v.shape) for k, v in fit.server.global_guide.state_dict().items()}
    with pyro.validation_enabled(False), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(fit.model).get_trace(fit.server.placeholder)
    d = trace.nodes[fit.family.local_site]["value"].numel()  # one client in the placeholder
    cov = torch.zeros(d) if fit.family.covariance == "diag" else torch.zeros(d, d)
    return {k: tuple(v.shape) for k, v in fit.family.client_summary(torch.zeros(d), cov).items()}


def audit(fit, log, raw_data):
    """Check every recorded message of ``fit`` against (i)-(iv); returns the up messages."""
    mode = fit.server.mode
    payload = "grads" if mode == "gradient" else "stats"
    reference = reference_shapes(fit)
    sizes = {name: fit.data.num_observations(i) for i, name in enumerate(fit.data.names)}
    rounds_sent = {}
    for client, message in log.down():
        where = f"down message to {client!r}, round {message.get('round')}"
        assert set(message) == DOWN_KEYS[mode], where
        assert message["mode"] == mode and isinstance(message["seed"], int), where
        rounds_sent.setdefault(client, set()).add(message["round"])
        for other, values in raw_data.items():
            assert_no_data_values(message, data_values(values), f"{where} vs {other!r}'s data")
            assert_no_shared_memory(message, data_tensors(fit, other), where)

    shapes_seen = {}
    ups = log.up()
    for client, message in ups:
        where = f"up message from {client!r}, round {message.get('round')}"
        # (i) only the allowed keys; metadata of the expected types and values
        assert set(message) == UP_KEYS[mode], f"{where}: keys {sorted(message)}"
        assert message["client"] == client, where
        assert isinstance(message["round"], int) and message["round"] in rounds_sent[client]
        assert isinstance(message["num_examples"], int), where
        assert message["num_examples"] == sizes[client], where
        assert isinstance(message["elbo"], float), where
        tensors = message[payload]
        assert all(isinstance(t, torch.Tensor) for t in tensors.values()), where
        # (ii) the keys and shapes are the data-free reference ones
        assert set(tensors) == set(reference), f"{where}: {sorted(tensors)} != {sorted(reference)}"
        for key, t in tensors.items():
            assert tuple(t.shape) == reference[key], f"{where}: {key} has shape {tuple(t.shape)}"
            assert t.dtype.is_floating_point, where
            shapes_seen.setdefault(key, set()).add(tuple(t.shape))
        # (iv) a dimension equal to n_i is only allowed where it is the parameter's own
        n = sizes[client]
        for key, t in tensors.items():
            ref = reference[key]
            for axis, size in enumerate(t.shape):
                if size == n:
                    assert axis < len(ref) and ref[axis] == size, (
                        f"{where}: {key} has a dimension of size n_i = {n} at axis {axis} "
                        f"that the data-free reference shape {ref} does not have"
                    )
        # (iii) no value of this client's data, and no memory shared with it
        assert_no_data_values(message, data_values(raw_data[client]), where)
        assert_no_shared_memory(message, data_tensors(fit, client), where)
    # (ii) across clients of different sizes every key has one shape
    assert all(len(s) == 1 for s in shapes_seen.values()), shapes_seen
    return ups


def run_audited(case, rounds=3):
    model, load, server, fraction = CASES[case]
    raw_data = load()
    log = MessageLog()
    fit = FederatedSVI(
        model,
        raw_data,
        server=server,
        fraction=fraction,
        local_steps=2,
        grad_particles=2,
        server_particles=2,
        seed=0,
        on_message=log,
    )
    fit.run(rounds, progress=False)
    return fit, log, raw_data


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_message_carries_data(case):
    fit, log, raw_data = run_audited(case)
    assert fit.server.mode == EXPECTED_MODE[case]
    ups = audit(fit, log, raw_data)
    # Every participating client spoke every round, so the audit saw all traffic.
    expected = sum(len(r["clients"]) for r in fit.history)
    assert len(ups) == expected and len(log.down()) == expected
    assert all(r["updated"] for r in fit.history)
    # The audit covers clients of different sizes wherever the data are ragged.
    sizes = {fit.data.num_observations(i) for i in range(len(fit.data))}
    assert len(sizes) > 1 or case.startswith("eight_schools")
    if case.startswith("vector"):
        assert D in sizes  # (iv) met a client whose n_i equals the parameter dimension


@pytest.mark.parametrize("case", ["normal_normal-closed_form", "eight_schools-gradient"])
def test_sent_messages_never_change_afterwards(case):
    """A reply must be a snapshot: no view of the client's parameters (which keep training)."""
    fit, log, _ = run_audited(case, rounds=3)
    for (d, c, sent), (_, _, snapshot) in zip(log.sent, log.copies):
        for (path, value), (_, original) in zip(leaves(sent), leaves(snapshot)):
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, original), f"{d} message to/from {c!r}: {path} changed"
            else:
                assert value == original, f"{d} message to/from {c!r}: {path} changed"


@pytest.mark.parametrize("case", ["normal_normal-closed_form", "eight_schools-gradient"])
def test_server_state_holds_no_data(case):
    """What the server keeps (its checkpointable state, its placeholder) holds no data."""
    fit, _, raw_data = run_audited(case, rounds=2)
    state = fit.server.state_dict()
    # The learnt content; optimiser hyper-parameters and step counters are configuration.
    content = {
        "global_guide": state.get("global_guide", {}),
        "family_params": state.get("family_params", {}),
        "moments": {
            str(i): {k: v for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
            for i, s in state.get("optim", {"state": {}})["state"].items()
        },
        "stale": {c: {"stats": r["stats"], "elbo": r["elbo"]} for c, r in state["stale"].items()},
    }
    tensors = [torch.as_tensor(t) for values in raw_data.values() for t in values.values()]
    all_values = torch.cat([data_values(values) for values in raw_data.values()])
    assert_no_data_values(content, all_values, "server state")
    assert_no_shared_memory(content, tensors, "server state")
    # The placeholder the server runs the model on depends on the schema only: the
    # same schema with other values gives the same placeholder.
    shifted = {
        name: {k: torch.as_tensor(v) * 3.0 + 1.5 for k, v in values.items()}
        for name, values in raw_data.items()
    }
    other = FederatedData(shifted).placeholder()
    assert set(other) == set(fit.server.placeholder)
    for key, value in fit.server.placeholder.items():
        assert torch.equal(value, other[key]), key


def test_audit_catches_a_leaking_client(monkeypatch):
    """The helper itself works: a client that smuggles data out is caught by each check."""
    fit, log, raw_data = run_audited("normal_normal-gradient", rounds=1)
    audit(fit, log, raw_data)  # the honest run passes
    name = fit.data.names[0]
    y = raw_data[name]["y"]
    honest = log.copies[1]
    assert honest[0] == "up" and honest[1] == name

    def audit_with(message):
        log.copies = [("down", name, log.copies[0][2]), ("up", name, message)]
        audit(fit, log, raw_data)

    leaks = {
        "extra key": {**honest[2], "data": y},
        "data-sized tensor": {**honest[2], "grads": {**honest[2]["grads"], "locs.mu": y}},
        "wrong shape": {
            **honest[2],
            "grads": {k: torch.zeros(len(y)) + 0.25 for k in honest[2]["grads"]},
        },
        "raw value": {**honest[2], "elbo": float(y[3])},
        "near value": {**honest[2], "elbo": float(y[3]) + 1e-12},
        "hidden value": {
            **honest[2],
            "grads": {
                k: torch.cat([v.reshape(-1)[:-1], y[:1]]).reshape(v.shape)
                for k, v in honest[2]["grads"].items()
            },
        },
    }
    for label, message in leaks.items():
        with pytest.raises(AssertionError):
            audit_with(message)
            pytest.fail(f"the audit missed the leak: {label}")  # not an AssertionError
