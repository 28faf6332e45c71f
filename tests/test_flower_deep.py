"""Deep trainers on Flower (issue 17): a deep FedHB run with its clients on Flower nodes,
driven by the trainer's own round loop, equals the in-process run.

The Flower runs are real simulations (Flower's simulation engine, ClientApps in Ray
workers). This file is also their *trainer file*: every process builds the trainer with
:func:`make_trainer` (the toy federation of ``deep_toys.py``). Every Flower/Ray process
gets the network hygiene of :mod:`hbfl_pyro.flower.env` (set here before ``flwr`` is
imported); the simulation's Ray processes are stopped by Flower when it returns.
"""

import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from deep_toys import OPTS, toy
from tree_asserts import assert_close, assert_same

from hbfl_pyro import ClientFailureWarning, DPConfig
from hbfl_pyro.deep import FedHB, FedProx, FlatNet, Pooled, fedavg_family, fedprox_family, iso_prior
from hbfl_pyro.flower.env import apply_network_hygiene

ROOT = Path(__file__).resolve().parents[1]
# Before flwr or ray is imported by anything in this process.
apply_network_hygiene(ROOT / ".flwr" / "tests")

THIS = str(Path(__file__).resolve())


#: The messages the trainer's hooks saw, ``(direction, client, message)`` (``log=True``).
#: The ServerApp of a simulation runs in the test's process, from this file imported as a
#: trainer file (a module of its own: :func:`hook_log` reads its list).
HOOK_LOG: list = []


def hook_log() -> list:
    return sys.modules["_hbfl_model_test_flower_deep"].HOOK_LOG


def make_trainer(
    family="fedhb", engine="inprocess", fraction=0.5, nan=(), bad=(), log=False, dp_clip=0.0, **kw
):
    """The trainer file's function: a deep FedHB of the toy federation.

    :param family: ``"fedhb"`` (iso prior), ``"fedavg"`` or ``"fedprox"`` (its NIW limits),
        ``"FedProx"`` (the FedProx class: FedHB with ``FedProxFamily``).
    :param nan: clients with a NaN feature (their training returns NaN weights).
    :param bad: clients with one feature short (their training raises).
    :param log: the trainer's hook appends every message to :data:`HOOK_LOG`.
    :param dp_clip: with ``dp=`` of this clip (noise multiplier 1, reproducible noise).
    """
    if dp_clip:  # client-level DP: the nodes clip, the server adds seeded noise
        kw["dp"] = DPConfig(clip=dp_clip, noise_multiplier=1.0, reproducible_noise=True)
    if log:
        HOOK_LOG.clear()
        kw["on_message"] = lambda *message: HOOK_LOG.append(message)
    # The same weights in every process: the tests run with float64 as torch's default
    # dtype (conftest), a SuperNode's or ServerApp's process with float32, and the
    # network's initial draw depends on it.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net, clients = toy(nan=tuple(nan))
    finally:
        torch.set_default_dtype(dtype)
    for i in bad:
        clients[i] = (clients[i][0][:, :3], clients[i][1])
    init = FlatNet(net).vector()
    options = dict(OPTS, fraction=fraction, engine=engine)
    if family == "fedhb":
        return FedHB(net, clients, iso_prior(init, prox_weight=3.0), eps=0.1, **options, **kw)
    if family == "fedavg":
        return FedHB(net, clients, fedavg_family(init), weighting="size", **options, **kw)
    if family == "fedprox":
        return FedHB(net, clients, fedprox_family(init, 2.0), **options, **kw)
    return FedProx(net, clients, mu=0.3, **options, **kw)  # FedHB with FedProxFamily


def in_process(rounds, **options):
    fit = make_trainer(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        fit.run(rounds)
    return fit


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.fixture(scope="module")
def flwr():
    return pytest.importorskip("flwr")


# ---------------------------------------------------------------------- no Flower needed
def test_a_node_trains_its_client_as_the_in_process_engine_does():
    from hbfl_pyro.flower.deep import train_client

    fit = make_trainer()
    chosen = fit.select(1)
    messages = fit.messages(1, chosen)
    replies, failures = fit.round_engine.run_round(messages)
    assert not failures
    for j, i in enumerate(chosen):
        reply = train_client(make_trainer(), i, messages[i])  # a node's own trainer
        assert reply == {**reply, "client": i, "round": 1, "num_examples": fit.sizes[i]}
        assert torch.equal(reply["m"], replies[j])


def test_a_node_reports_its_clients_error_as_in_process():
    from hbfl_pyro.flower.deep import train_client

    fit = make_trainer(fraction=1.0, bad=(2,))
    with pytest.warns(ClientFailureWarning):
        _, failures = fit.round_engine.run_round(fit.messages(1, [0, 2]))
    reply = train_client(make_trainer(fraction=1.0, bad=(2,)), 2, fit.messages(1, [2])[2])
    assert reply == {"client": 2, "round": 1, "error": failures[2]}
    assert failures[2].startswith("RuntimeError: mat1 and mat2 shapes")


def test_trainers_whose_clients_keep_state_on_the_trainer_are_refused():
    from hbfl_pyro.flower.deep import check_trainer

    net, clients = toy()
    with pytest.raises(TypeError, match="only FedHB"):
        check_trainer(Pooled(net, clients, **OPTS))
    with pytest.raises(ValueError, match="start='own'"):
        check_trainer(make_trainer(start="own"))
    assert check_trainer(make_trainer()) is not None


# ---------------------------------------------------------------------- simulation
@pytest.mark.slow
def test_simulation_equals_in_process_bit_for_bit(flwr):
    """FedHB, half the clients a round, 3 rounds; the trainer trains its clients one after
    another in process (engine="inprocess"), as each node does: equal bit for bit, and
    the server's hooks see the same messages, down and up, in the same order."""
    from hbfl_pyro.flower.deep import load_deep_result, simulate_deep

    result = simulate_deep(f"{THIS}:make_trainer", 3, {"log": True})
    on_flower = list(hook_log())
    fit = in_process(3, log=True)
    assert len(on_flower) == 2 * 9  # 3 clients a round, each a message down and a reply up
    assert_same(on_flower, HOOK_LOG)
    assert without_seconds(result["history"]) == without_seconds(fit.history)
    assert_same(result["state"], fit.state_dict() | {"history": result["state"]["history"]})
    back = make_trainer()
    load_deep_result(back, result)
    assert torch.equal(back.global_weights(), fit.global_weights())
    assert sorted(result["nodes"]) == list(range(6))
    # Messages are q(phi) and one weight vector (d = 51): under 2 kB.
    assert [t["round"] for t in result["traffic"]] == [1, 2, 3]
    assert max(max(t["bytes_down"] + t["bytes_up"]) for t in result["traffic"]) < 2000


@pytest.mark.slow
def test_a_failing_client_is_reported_as_in_process(flwr):
    """FedAvg (FedHB's family), every client every round: client 1's training returns NaN
    and client 4's raises; both are left out and named with the in-process reasons, the
    rest of the run equals the in-process one bit for bit, and in round 3 (their third
    failure in a row) the run stops with the in-process ClientFailureError."""
    from hbfl_pyro import ClientFailureError
    from hbfl_pyro.flower.deep import simulate_deep

    options = {"family": "fedavg", "fraction": 1.0, "nan": [1], "bad": [4]}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = simulate_deep(f"{THIS}:make_trainer", 4, options)
    fit = make_trainer(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientFailureWarning)
        with pytest.raises(ClientFailureError) as stopped:
            fit.run(4)
    assert result["stopped"] == str(stopped.value) and "round 3" in result["stopped"]
    assert result["round"] == fit.round == 3
    assert without_seconds(result["history"]) == without_seconds(fit.history)
    for record in result["history"]:
        assert record["failed"] == [1, 4] and record["clients"] == [0, 2, 3, 5]
        assert record["errors"][1] == "its local training returned NaN or Inf weights"
        assert record["errors"][4].startswith("RuntimeError: mat1 and mat2 shapes")
    assert_same(result["state"]["server"], fit.state_dict()["server"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["fedprox", "FedProx"])
def test_vectorised_simulation_equals_in_process_to_round_off(flwr, family):
    """FedProx with the vectorised engine, as FedHB's NIW limit (fedprox_family) and as
    the FedProx class (FedHB with FedProxFamily): in process the round's clients train in
    one vmapped batch, on Flower one a node. Measured equal bit for bit here, but nothing
    promises that a batch's reductions round as a batch of one's (another BLAS, thread
    count or chunking may not), so the runs are held to 1e-12 (relative)."""
    from hbfl_pyro.flower.deep import simulate_deep

    options = {"family": family, "engine": "vectorised"}
    result = simulate_deep(f"{THIS}:make_trainer", 3, options)
    fit = in_process(3, **options)
    ours, theirs = without_seconds(fit.history), without_seconds(result["history"])
    assert [sorted(r) for r in theirs] == [sorted(r) for r in ours]
    for a, b in zip(theirs, ours):
        for key, value in b.items():  # round, clients; FedHB's prox_weight, client_spread
            expected = pytest.approx(value, rel=1e-12, abs=1e-15)
            assert a[key] == (expected if isinstance(value, float) else value), key
    state = fit.state_dict()
    assert_close(result["state"]["server"], state["server"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- deployment
def _write_app(directory: Path) -> Path:
    """A Flower app running the deep apps (``flwr run`` builds it into a FAB); it declares
    every run-config key the apps read, as ``flwr run`` refuses undeclared ones."""
    from hbfl_pyro.flower.deep import DEEP_CONFIG_DEFAULTS

    package = directory / "hbfl_deep_app"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Deep FedHB on Flower."""\n')
    for side in ("server", "client"):
        (package / f"{side}_app.py").write_text(
            f"from hbfl_pyro.flower import deep_{side}_app\n\napp = deep_{side}_app()\n"
        )

    def toml(value):
        return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')

    config = "\n".join(f"{key} = {toml(value)}" for key, value in DEEP_CONFIG_DEFAULTS.items())
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "hbfl-deep-app"\nversion = "0.1.0"\nlicense = "Apache-2.0"\n'
        'dependencies = ["hbfl_pyro[flower]"]\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "hbfl-pyro"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "hbfl_deep_app.server_app:app"\n'
        'clientapp = "hbfl_deep_app.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )
    return directory


@pytest.mark.slow
def test_deployment_on_loopback_equals_in_process(flwr, tmp_path):
    """A SuperLink and six SuperNodes on 127.0.0.1 (started and stopped by PID, as the
    core's deployment tests do): FedHB's 2 rounds equal the in-process run bit for bit."""
    from test_flower import LOOPBACK, Deployment, _alive, _listening, _wait_for

    app = _write_app(tmp_path / "app")
    out = tmp_path / "out"
    config = {
        "trainer": f"{THIS}:make_trainer",
        "rounds": 2,
        "num-clients": 6,
        "out-dir": str(out),
        "round-timeout": 120.0,
    }
    with Deployment(tmp_path, num_nodes=6) as deployment:
        deployment.flwr_run(config, app=app)
        listening = _listening(deployment.pids())
        assert listening and all(address in LOOPBACK for address, _ in listening), listening
        _wait_for(out / "result.pt", 240, deployment)
        started = deployment.pids()
    time.sleep(1.0)
    assert not [p for p in started if _alive(p)], "a process outlived the deployment"
    result = torch.load(out / "result.pt", weights_only=False)
    fit = in_process(2)
    assert without_seconds(result["history"]) == without_seconds(fit.history)
    assert_same(result["state"]["server"], fit.state_dict()["server"])


@pytest.mark.slow
def test_differentially_private_simulation_equals_in_process(flwr):
    """FedHB(dp=...): each node clips its client's update about the m0 it was sent, the
    ServerApp's server clips again and adds the noise (seeded by the run's seed and the
    round: reproducible_noise), so the private run equals the in-process one bit for bit,
    epsilon included."""
    from hbfl_pyro.flower.deep import simulate_deep

    options = {"dp_clip": 0.5}
    result = simulate_deep(f"{THIS}:make_trainer", 3, options)
    fit = in_process(3, **options)
    assert without_seconds(result["history"]) == without_seconds(fit.history)
    assert result["history"][-1]["epsilon"] == fit.privacy["epsilon"] > 0
    assert_same(result["state"]["server"], fit.state_dict()["server"])
