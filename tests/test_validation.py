"""Reliability (evaluation.md §D): bad input fails up front, faults are contained.

Bad input (data, model structure, guides) must raise in ``FederatedSVI(...)`` itself,
before any message is sent or any client update runs, with an error that names the
offending client and/or site and says how to fix it; nothing the user passed is changed.
During training, a client that crashes or replies with non-finite values is left out with
a :class:`ClientFailureWarning` naming it; the server updates only when ``min_clients``
good replies arrived, and a round in which every client crashes raises without touching
the server's state.
"""

import copy
import re
import warnings

import eight_schools
import normal_normal
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

import hbfl_pyro.client
import hbfl_pyro.server
from hbfl_pyro import (
    ClientFailureWarning,
    DataValidationError,
    FederatedSVI,
    GuideError,
    ModelStructureError,
    num_clients,
)

FAST = dict(local_steps=2, grad_particles=2, server_particles=2, seed=0)


# ---------------------------------------------------------------------- helpers
def _nn_data(sizes=(3, 5, 4), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {f"c{i}": {"y": 3.0 + torch.randn(n, generator=gen)} for i, n in enumerate(sizes)}


def _snapshot(obj):
    """A deep copy for later comparison (tensors cloned)."""
    return copy.deepcopy(obj)


def _assert_same(a, b, path="state"):
    """Recursive exact equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():  # NaN equals NaN here
            assert bool(((a == b) | (a.isnan() & b.isnan())).all()), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert a == b, path


def _assert_message(exc_info, *words):
    message = str(exc_info.value)
    for word in words:
        assert word in message, f"{word!r} not in the error message: {message}"


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if any client update or server aggregation runs."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the validation error")

    monkeypatch.setattr(hbfl_pyro.client.Client, "update", forbidden)
    monkeypatch.setattr(hbfl_pyro.server.Server, "aggregate", forbidden)
    messages = []
    yield lambda direction, client, message: messages.append((direction, client))
    assert messages == [], "messages were sent before the validation error"


def _nn_model(prior_loc=lambda data: 0.0):
    """Normal-Normal model (ragged clients); the global prior's location is a hook."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(prior_loc(data), 10.0))
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 2.0))
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])

    return model


# ---------------------------------------------------------------------- (a) local outside plate
def test_local_site_outside_the_plate_is_named(no_training):
    def model(data):
        C = num_clients(data)
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        theta = pyro.sample("theta", dist.Normal(mu, 1.0).expand([C]).to_event(1))
        with pyro.plate("clients", C, dim=-2):
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta[:, None], 1.0), obs=data["y"])

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training, **FAST)
    _assert_message(info, "'theta'", "outside the 'clients' plate", "inside", "pyro.plate")


# ---------------------------------------------------------------------- (b) data-dependent global
@pytest.mark.parametrize("server", ["auto", "gradient"])
def test_global_site_depending_on_client_data_is_named(no_training, server):
    model = _nn_model(prior_loc=lambda data: data["y"].mean())
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), server=server, on_message=no_training, **FAST)
    _assert_message(info, "'mu'", "depends on client data", "'c0'", "'c1'", "inside")


def test_data_dependent_global_is_caught_with_a_single_client(no_training):
    # One client: nothing to compare between clients, but the server evaluates the prior
    # on a data-free placeholder, so the dependence would silently change the server term.
    model = _nn_model(prior_loc=lambda data: data["y"].mean())
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(sizes=(4,)), server="gradient", on_message=no_training)
    _assert_message(info, "'mu'", "depends on client data", "'c0'", "placeholder")


def test_data_dependent_global_is_caught_when_clients_share_the_value(no_training):
    # Every client holds the same per-client value the prior reads: clients agree with
    # each other, but the server (which never sees the data) would use another value.
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, data["prior_scale"][0]))
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 2.0))
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])

    data = {k: {**v, "prior_scale": torch.tensor(7.0)} for k, v in _nn_data().items()}
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, data, server="gradient", on_message=no_training)
    _assert_message(info, "'mu'", "depends on client data", "placeholder")


# ---------------------------------------------------------------------- (c) schemas
def test_clients_with_mismatched_keys_are_named(no_training):
    data = eight_schools.load_data()
    data["C"] = {"y": torch.tensor(-3.0)}  # 'sigma' missing
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(eight_schools.noncentered, data, on_message=no_training)
    _assert_message(info, "'C'", "'sigma'", "missing", "same keys")

    data = eight_schools.load_data()
    data["D"]["extra"] = torch.tensor(1.5)
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(eight_schools.noncentered, data, on_message=no_training)
    _assert_message(info, "'D'", "'extra'", "same keys")


def test_clients_with_mismatched_trailing_shapes_are_named(no_training):
    data = {
        "north": {"x": torch.randn(3, 2), "y": torch.randn(3)},
        "south": {"x": torch.randn(4, 2), "y": torch.randn(4)},
        "east": {"x": torch.randn(5, 3), "y": torch.randn(5)},
    }
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'east'", "'x'", "(5, 3)", "(n, 2)", "first dimension")


def test_per_client_value_with_a_wrong_shape_is_named(no_training):
    data = eight_schools.load_data()
    data["F"]["sigma"] = torch.tensor([11.0, 12.0])
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(eight_schools.noncentered, data, on_message=no_training)
    _assert_message(info, "'F'", "'sigma'", "shape")


def test_disagreeing_observation_counts_within_a_client_are_named(no_training):
    data = {
        "a": {"x": torch.randn(3), "y": torch.randn(3)},
        "b": {"x": torch.randn(2), "y": torch.randn(4)},
    }
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'b'", "'x'", "'y'", "per_client")


def test_unknown_per_client_key_is_named(no_training):
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            per_client=("sgima",),
            on_message=no_training,
        )
    _assert_message(info, "'sgima'", "per_client")


# ---------------------------------------------------------------------- (d) NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_observation_is_named(no_training, bad):
    data = _nn_data()
    data["c1"]["y"] = data["c1"]["y"].clone()
    data["c1"]["y"][2] = bad
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'c1'", "'y'", "NaN or Inf", "index (2,)", "clean or impute")


def test_non_finite_per_client_value_is_named(no_training):
    data = eight_schools.load_data()
    data["G"]["sigma"] = torch.tensor(float("nan"))
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(eight_schools.noncentered, data, on_message=no_training)
    _assert_message(info, "'G'", "'sigma'", "NaN or Inf", "clean or impute")


def test_non_finite_numpy_input_is_named(no_training):
    data = {"a": {"y": np.array([1.0, 2.0])}, "b": {"y": np.array([0.5, np.inf, 1.0])}}
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'b'", "'y'", "NaN or Inf")


# ---------------------------------------------------------------------- (e) empty client
@pytest.mark.parametrize(
    "empty", [{"y": torch.tensor([])}, {"y": []}, {"y": np.zeros(0)}], ids=["tensor", "list", "np"]
)
def test_empty_client_is_named(no_training, empty):
    data = _nn_data()
    data["c2"] = empty
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'c2'", "empty", "0 observations", "drop it")


def test_client_without_any_key_is_named(no_training):
    data = _nn_data()
    data["c0"] = {}
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, data, on_message=no_training)
    _assert_message(info, "'c0'", "no data", "drop it")


def test_no_clients_at_all(no_training):
    with pytest.raises(DataValidationError) as info:
        FederatedSVI(normal_normal.model, {}, on_message=no_training)
    _assert_message(info, "no clients")


# ---------------------------------------------------------------------- (f) guides
class _SamplesNothing(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(()))

    def forward(self, data):
        return self.loc


class _LocalGuide(PyroModule):
    """A mean-field local guide of one site (inside the clients plate)."""

    def __init__(self, site="theta_trans"):
        super().__init__()
        self.site = site
        self.loc = PyroParam(torch.zeros(1))
        self.scale = PyroParam(torch.ones(1), constraint=dist.constraints.positive)

    def forward(self, data):
        with pyro.plate("clients", num_clients(data)):
            pyro.sample(self.site, dist.Normal(self.loc, self.scale))


class _GlobalGuide(PyroModule):
    """A global guide of eight schools' ``mu`` and (optionally) ``tau``."""

    def __init__(self, with_tau=True, with_local=False):
        super().__init__()
        self.with_tau, self.with_local = with_tau, with_local
        self.mu_loc = PyroParam(torch.tensor(0.0))
        self.tau_loc = PyroParam(torch.tensor(0.0))

    def forward(self, data):
        pyro.sample("mu", dist.Normal(self.mu_loc, 1.0))
        if self.with_tau:
            pyro.sample("tau", dist.LogNormal(self.tau_loc, 0.5))
        if self.with_local:
            with pyro.plate("clients", num_clients(data)):
                pyro.sample("theta_trans", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "guide", [_SamplesNothing(), _LocalGuide("theta")], ids=["samples-nothing", "wrong-site"]
)
def test_local_guide_missing_the_local_site_is_named(no_training, guide):
    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=guide,
            on_message=no_training,
        )
    _assert_message(info, "local guide", "'theta_trans'", "add `pyro.sample`")


def test_global_guide_missing_a_global_site_is_named(no_training):
    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            global_guide=_GlobalGuide(with_tau=False),
            on_message=no_training,
        )
    _assert_message(info, "global guide", "'tau'", "add `pyro.sample`")


def test_global_guide_sampling_a_local_site_is_named(no_training):
    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            global_guide=_GlobalGuide(with_local=True),
            on_message=no_training,
        )
    _assert_message(info, "'theta_trans'", "not global", "exactly the global sites")


def test_local_guide_site_with_the_wrong_shape_is_named(no_training):
    class OutsidePlate(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(3))

        def forward(self, data):
            pyro.sample("theta_trans", dist.Normal(self.loc, 1.0).to_event(1))

    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=OutsidePlate(),
            on_message=no_training,
        )
    _assert_message(info, "'theta_trans'", "shape (3,)", "shape (1,)", "pyro.plate('clients'")


def test_non_reparameterisable_local_guide_is_named(no_training):
    class Discrete(PyroModule):
        def forward(self, data):
            with pyro.plate("clients", num_clients(data)):
                pyro.sample("theta_trans", dist.Poisson(torch.ones(1)))

    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=Discrete(),
            on_message=no_training,
        )
    _assert_message(info, "'theta_trans'", "not reparameterisable", "continuous guide")


def test_guide_that_is_not_a_module_is_rejected(no_training):
    def guide(data):
        pyro.sample("theta_trans", dist.Normal(0.0, 1.0))

    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=guide,
            on_message=no_training,
        )
    _assert_message(info, "local guide", "PyroModule")


def test_guide_that_crashes_is_a_guide_error(no_training):
    class Crashes(PyroModule):
        def forward(self, data):
            return data["no_such_key"]

    with pytest.raises(GuideError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=Crashes(),
            on_message=no_training,
        )
    _assert_message(info, "local guide", "KeyError", "'no_such_key'")


@pytest.mark.slow
def test_user_guide_modules_train_and_are_left_untouched():
    """A user's PyroModule guides (built outside any Pyro setting) work, and are copied."""
    local, global_ = _LocalGuide(), _GlobalGuide()
    local_before = {k: v.detach().clone() for k, v in local.state_dict().items()}
    global_before = {k: v.detach().clone() for k, v in global_.state_dict().items()}
    fit = FederatedSVI(
        eight_schools.noncentered,
        eight_schools.load_data(),
        local_guide=local,
        global_guide=global_,
        **FAST,
    )
    fit.run(2, progress=False)
    assert all(r["updated"] for r in fit.history)
    assert fit.server.global_guide is not global_
    trained = fit.server.global_guide.state_dict()
    assert sorted(trained) == sorted(global_before)
    assert any(not torch.equal(trained[k], v) for k, v in global_before.items()), (
        "the server did not train its global guide"
    )
    _assert_same(local.state_dict(), local_before)
    _assert_same(global_.state_dict(), global_before)
    assert len(pyro.get_param_store()) == 0


# ---------------------------------------------------------------------- (g), (h) model structure
def test_observed_site_outside_the_plate_is_named(no_training):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 2.0))
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        pyro.sample("anchor", dist.Normal(mu, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training)
    _assert_message(info, "'anchor'", "outside the 'clients' plate", "move it inside")


def test_model_without_a_clients_plate(no_training):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1):
            pyro.sample(
                "y", dist.Normal(mu, 1.0).expand(data["y"].shape).to_event(1), obs=data["y"]
            )

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training)
    _assert_message(info, "'clients'", "with pyro.plate('clients'", "plate=")


def _schools_model(data):
    """normal_normal's model with its clients plate named as a user might: 'schools'."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("schools", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])


def test_the_one_plate_with_an_entry_per_client_is_taken_with_a_warning(no_training):
    with pytest.warns(UserWarning, match="its plate 'schools' has one entry per client"):
        fit = FederatedSVI(_schools_model, _nn_data(), on_message=no_training)
    assert fit.structure.plate == "schools"
    assert fit.structure.local_sites == ("theta",)
    assert fit.structure.global_sites == ("mu",)
    # Naming it says so: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        named = FederatedSVI(_schools_model, _nn_data(), plate="schools", on_message=no_training)
    assert named.structure == fit.structure


def test_two_plates_with_an_entry_per_client_are_not_guessed(no_training):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("schools", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        with pyro.plate("sites", num_clients(data), dim=-2):
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training)
    _assert_message(info, "'clients'", "'schools'", "'sites'", "name one")


def test_one_client_cannot_tell_which_plate_is_the_clients_plate(no_training):
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(_schools_model, _nn_data(sizes=(4,)), on_message=no_training)
    _assert_message(info, "'clients'", "plate=")


def test_plate_name_must_match_the_plate_argument(no_training):
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(normal_normal.model, _nn_data(), plate="groups", on_message=no_training)
    _assert_message(info, "'groups'", "plate=")


def test_model_without_observations(no_training):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("clients", num_clients(data)):
            pyro.sample("theta", dist.Normal(mu, 2.0))

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training)
    _assert_message(info, "no observed site", "obs=")


def test_model_that_crashes_on_the_data_names_the_client(no_training):
    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("clients", num_clients(data)):
            pyro.sample("y", dist.Normal(mu, data["sd"]), obs=data["y"][..., 0])

    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(model, _nn_data(), on_message=no_training)
    _assert_message(info, "'c0'", "KeyError", "'sd'")


def test_closed_form_impossible_names_the_sites(no_training):
    with pytest.raises(ModelStructureError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            server="closed_form",
            on_message=no_training,
        )
    _assert_message(info, "'mu'", "'tau'", "server='gradient'")


@pytest.mark.parametrize(
    "option", [{"fraction": 0.0}, {"fraction": 1.5}, {"participation": "all"}, {"server": "exact"}]
)
def test_bad_options_are_rejected(no_training, option):
    with pytest.raises(ValueError) as info:
        FederatedSVI(
            eight_schools.noncentered, eight_schools.load_data(), on_message=no_training, **option
        )
    _assert_message(info, repr(next(iter(option.values()))))


@pytest.mark.parametrize("min_clients", [0, 9])
def test_impossible_min_clients_is_rejected(no_training, min_clients):
    with pytest.raises(ValueError) as info:
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            min_clients=min_clients,
            on_message=no_training,
        )
    _assert_message(info, "min_clients", str(min_clients))


# ---------------------------------------------------------------------- nothing is lost
def test_bad_data_fails_before_the_model_runs_and_leaves_the_input_unchanged():
    calls = []

    def model(data):
        calls.append(1)
        return normal_normal.model(data)

    data = _nn_data()
    data["c1"]["y"] = data["c1"]["y"].clone()
    data["c1"]["y"][0] = float("nan")
    before = _snapshot(data)
    identities = {k: {kk: id(vv) for kk, vv in v.items()} for k, v in data.items()}
    with pytest.raises(DataValidationError):
        FederatedSVI(model, data, seed=0)
    assert calls == [], "the model ran on invalid data"
    assert len(pyro.get_param_store()) == 0
    _assert_same(data, before)
    assert {k: {kk: id(vv) for kk, vv in v.items()} for k, v in data.items()} == identities


@pytest.mark.parametrize("kind", ["tensor", "float32", "numpy", "list"])
def test_training_does_not_mutate_the_users_data(kind):
    convert = {
        "tensor": lambda t: t,
        "float32": lambda t: t.float(),
        "numpy": lambda t: t.numpy(),
        "list": lambda t: t.tolist(),
    }[kind]
    data = {k: {"y": convert(v["y"])} for k, v in _nn_data().items()}
    before = _snapshot(data)
    fit = FederatedSVI(normal_normal.model, data, **FAST)
    fit.run(2, progress=False)
    _assert_same(data, before)
    # Also in gradient mode, where the data flow through autograd.
    fit = FederatedSVI(normal_normal.model, data, server="gradient", **FAST)
    fit.run(2, progress=False)
    _assert_same(data, before)
    assert len(pyro.get_param_store()) == 0


def test_a_failed_construction_does_not_disturb_a_running_fit():
    fit = FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), **FAST)
    reference = FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), **FAST)
    fit.step()
    reference.step()
    bad = eight_schools.load_data()
    bad["A"]["y"] = torch.tensor(float("inf"))
    with pytest.raises(DataValidationError):
        FederatedSVI(eight_schools.noncentered, bad, **FAST)
    with pytest.raises(GuideError):
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            global_guide=_GlobalGuide(with_tau=False),
            **FAST,
        )
    fit.step()
    reference.step()
    _assert_same(fit.server.state_dict(), reference.server.state_dict())
    assert [r["elbo"] for r in fit.history] == [r["elbo"] for r in reference.history]


# ---------------------------------------------------------------------- faults in training
def _server_state(fit):
    return _snapshot(fit.server.state_dict())


def _fit(mode, **kwargs):
    options = dict(FAST)
    options.update(kwargs)
    if mode == "gradient":
        return FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), **options)
    return FederatedSVI(normal_normal.model, normal_normal.load_data(num_clients=5), **options)


def _step_warns(fit, *patterns):
    """Run one round; every pattern must match some ClientFailureWarning it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = fit.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, ClientFailureWarning)]
    for pattern in patterns:
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)
    return record, messages


def _crash(fit, name, monkeypatch):
    def update(message):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fit.clients[name], "update", update)


def _corrupt(fit, name, monkeypatch, how):
    original = fit.clients[name].update

    def update(message):
        reply = original(message)
        if how == "elbo":
            reply["elbo"] = float("nan")
        else:
            part = reply["grads"] if "grads" in reply else reply["stats"]
            key = sorted(part)[0]
            part[key] = part[key].clone().fill_(float(how))
        return reply

    monkeypatch.setattr(fit.clients[name], "update", update)


@pytest.mark.parametrize("mode", ["gradient", "closed_form"])
def test_crashing_client_is_excluded_and_the_round_proceeds(mode, monkeypatch):
    ups = []
    fit = _fit(mode, on_message=lambda d, c, m: ups.append(c) if d == "up" else None)
    victim = fit.data.names[1]
    _crash(fit, victim, monkeypatch)
    before = _server_state(fit)
    record, _ = _step_warns(fit, rf"client '{victim}' failed: RuntimeError: disk on fire")
    assert record["failed"] == [victim]
    assert record["clients"] == sorted(set(fit.data.names) - {victim})
    assert record["updated"] and np.isfinite(record["elbo"])
    assert victim not in ups and len(ups) == len(fit.data.names) - 1
    key = "global_guide" if mode == "gradient" else "family_params"
    assert any(
        not torch.equal(before[key][k], v) for k, v in fit.server.state_dict()[key].items()
    ), "the server did not update from the other clients"
    if mode == "closed_form":
        assert victim not in fit.server.stale


@pytest.mark.parametrize(
    "mode, how",
    [("gradient", "nan"), ("gradient", "inf"), ("gradient", "elbo"), ("closed_form", "nan")],
)
def test_non_finite_reply_is_excluded_with_a_warning(mode, how, monkeypatch):
    fit = _fit(mode)
    victim = fit.data.names[0]
    _corrupt(fit, victim, monkeypatch, how)
    before = _server_state(fit)
    record, _ = _step_warns(
        fit,
        rf"client '{victim}' sent an unusable reply \(.*(NaN or Inf|not a finite number)",
    )
    assert record["failed"] == [victim] and victim not in record["clients"]
    assert record["updated"] and np.isfinite(record["elbo"])
    state = fit.server.state_dict()
    key = "global_guide" if mode == "gradient" else "family_params"
    for k, v in state[key].items():
        assert torch.isfinite(v).all(), k
    assert any(not torch.equal(before[key][k], v) for k, v in state[key].items())
    if mode == "closed_form":
        assert victim not in fit.server.stale


@pytest.mark.parametrize("mode", ["gradient", "closed_form"])
def test_too_few_good_replies_leave_the_server_unchanged(mode, monkeypatch):
    fit = _fit(mode, min_clients=4)
    names = fit.data.names
    fit.step()  # a normal round first, so the state (Adam moments, stale sums) is non-trivial
    _crash(fit, names[0], monkeypatch)
    _corrupt(fit, names[1], monkeypatch, "nan")
    for name in names[4:]:
        _crash(fit, name, monkeypatch)
    before = _server_state(fit)
    record, _ = _step_warns(
        fit,
        r"only 2 good replies \(min_clients=4\)",
        rf"client '{names[0]}' failed",
        rf"client '{names[1]}' sent an unusable reply",
        *(rf"client '{name}' failed" for name in names[4:]),
    )
    assert record["updated"] is False
    assert record["clients"] == sorted(names[2:4])
    assert record["failed"] == sorted([names[0], names[1], *names[4:]])
    _assert_same(fit.server.state_dict(), before)
    assert fit.round == 2 and len(fit.history) == 2


@pytest.mark.parametrize("mode", ["gradient", "closed_form"])
def test_every_client_failing_raises_and_keeps_the_server_state(mode, monkeypatch):
    fit = _fit(mode)
    fit.step()
    before, history = _server_state(fit), _snapshot(fit.history)
    originals = {name: fit.clients[name].update for name in fit.data.names}
    for name in fit.data.names:
        _crash(fit, name, monkeypatch)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as info:
        warnings.simplefilter("always")
        fit.step()
    failed = {str(w.message) for w in caught if issubclass(w.category, ClientFailureWarning)}
    assert len(failed) == len(fit.data.names)
    _assert_message(info, "every client failed", "disk on fire", "unchanged")
    _assert_same(fit.server.state_dict(), before)
    assert fit.round == 1
    _assert_same(fit.history, history)
    # Once the clients recover, the run simply continues with the next round.
    for name, update in originals.items():
        monkeypatch.setattr(fit.clients[name], "update", update)
    record = fit.step()
    assert record["round"] == 2 and record["updated"]


def _garbage(reply, how):
    if how == "none":
        return None
    reply = dict(reply)
    if how == "missing":
        reply.pop("grads")
    elif how == "shape":
        reply["grads"] = {k: torch.zeros(3) for k in reply["grads"]}
    elif how == "keys":
        reply["grads"] = {"not_a_param": torch.zeros(())}
    elif how == "type":
        reply["grads"] = {k: "garbage" for k in reply["grads"]}
    return reply


@pytest.mark.parametrize("how", ["none", "missing", "shape", "keys", "type"])
def test_garbage_reply_is_excluded_with_a_warning(how, monkeypatch):
    fit = _fit("gradient")
    victim = fit.data.names[2]
    original = fit.clients[victim].update
    monkeypatch.setattr(fit.clients[victim], "update", lambda m: _garbage(original(m), how))
    record, _ = _step_warns(fit, rf"'{victim}'")
    assert record["failed"] == [victim] and record["updated"]


def test_failed_client_rejoins_in_the_next_round(monkeypatch):
    fit = _fit("gradient")
    victim = fit.data.names[3]
    original = fit.clients[victim].update
    _crash(fit, victim, monkeypatch)
    _step_warns(fit, rf"'{victim}'")
    monkeypatch.setattr(fit.clients[victim], "update", original)
    record = fit.step()
    assert record["failed"] == [] and victim in record["clients"]


def test_autoguide_class_arguments_still_work():
    fit = FederatedSVI(
        eight_schools.noncentered,
        eight_schools.load_data(),
        local_guide=AutoNormal,
        global_guide=AutoNormal,
        **FAST,
    )
    fit.run(2, progress=False)
    assert [r["updated"] for r in fit.history] == [True, True]


def test_user_global_guide_is_not_silently_ignored_in_closed_form(no_training):
    with pytest.raises((GuideError, ValueError)) as info:
        FederatedSVI(
            normal_normal.model,
            _nn_data(),
            global_guide=_SamplesNothing(),
            on_message=no_training,
        )
    _assert_message(info, "global")


def test_closed_form_with_a_momentless_local_guide_fails_up_front(no_training):
    class LocalTheta(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(1, 1))

        def forward(self, data):
            with pyro.plate("clients", num_clients(data), dim=-2):
                pyro.sample("theta", dist.Normal(self.loc, 1.0))

    with pytest.raises((GuideError, ModelStructureError, ValueError)) as info:
        FederatedSVI(
            normal_normal.model,
            _nn_data(),
            server="closed_form",
            local_guide=LocalTheta(),
            on_message=no_training,
        )
    _assert_message(info, "'theta'")


def test_a_diverging_server_update_is_refused_and_state_kept(monkeypatch):
    """A NaN gradient of q(phi) stops the run with an error naming the parameters and the
    fix; q(phi), its optimiser and the round counter stay at the last good round."""
    fit = FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), local_steps=2, seed=0)
    fit.run(2, progress=False)
    before = copy.deepcopy(fit.server.state_dict())
    real = hbfl_pyro.server.server_term
    monkeypatch.setattr(
        hbfl_pyro.server, "server_term", lambda *a, **k: real(*a, **k) * float("nan")
    )
    with pytest.raises(FloatingPointError, match=r"round 3: .*NaN or Inf.*Lower server_lr"):
        fit.step()
    assert fit.round == 2 and len(fit.history) == 2
    _assert_same(fit.server.state_dict(), before)


def test_obs_mask_is_refused_naming_the_site_and_the_fix():
    """``obs_mask=`` imputes missing observations as latent values with no density: no
    server can fit them (the held-out sweep's gradient fit climbed without bound for 1000
    rounds), so the model is refused up front, with the mask-based alternative."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            with pyro.plate("obs", data["y"].shape[-1], dim=-1):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"], obs_mask=data["seen"])

    clients = {
        f"c{i}": {"y": torch.tensor([0.5, 1.0, 0.0]), "seen": torch.tensor([True, True, False])}
        for i in range(3)
    }
    with pytest.raises(ModelStructureError, match=r"'y' uses obs_mask=.*poutine\.mask"):
        FederatedSVI(model, clients)
