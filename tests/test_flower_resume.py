"""A Flower run restarted from its checkpoint continues to the same result, bit for bit.

The ServerApp writes its state (round, server, history) to the run-config key
``checkpoint`` after every round and loads ``resume`` before the first; each node writes
its client's state to its ``state-dir`` after every update and, told by the first train
message of a resumed run, loads it back: the clients' states never leave their nodes. A
run stopped after round k (``stop-after-round``) and resumed in a new run ends with the
uninterrupted run's server and client states (``torch.equal``) and ELBOs (``==``).

Every Flower/Ray process gets the network hygiene of :mod:`hbfl_pyro.flower.env` (set
here before ``flwr`` is imported).
"""

from pathlib import Path

import pytest
from tree_asserts import assert_close, assert_same

from hbfl_pyro.flower.env import apply_network_hygiene

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
# Before flwr or ray is imported by anything in this process.
apply_network_hygiene(ROOT / ".flwr" / "tests")


@pytest.fixture(scope="module")
def flwr():
    return pytest.importorskip("flwr")


def assert_resumed_equals_uninterrupted(resumed, whole, stopped_after):
    assert resumed["resumed_after"] == stopped_after
    assert resumed["round"] == whole["round"]
    assert [r["elbo"] for r in resumed["history"]] == [r["elbo"] for r in whole["history"]]
    for theirs, ours in zip(resumed["history"], whole["history"]):
        for key in ("round", "clients", "failed"):
            assert theirs[key] == ours[key], (key, theirs, ours)
    assert_same(resumed["server"], whole["server"], "server")
    assert_same(resumed["clients"], whole["clients"], "clients")


def interrupted_then_resumed(tmp_path, model, rounds, options, stop_after, extra=None):
    """Run ``stop_after`` rounds with a checkpoint, then resume in a new run (both runs
    with the run-config entries ``extra`` too)."""
    from hbfl_pyro.flower import simulate

    checkpoint = tmp_path / "server.pt"
    nodes = tmp_path / "nodes"
    first = simulate(
        MODELS / model,
        rounds,
        options,
        run_config={
            **(extra or {}),
            "checkpoint": str(checkpoint),
            "state-dir": str(nodes),
            "stop-after-round": stop_after,
        },
    )
    assert first["stopped_after"] == first["round"] == stop_after
    assert checkpoint.is_file() and sorted(p.name for p in nodes.iterdir())
    return simulate(
        MODELS / model,
        rounds,
        options,
        run_config={**(extra or {}), "resume": str(checkpoint), "state-dir": str(nodes)},
    )


@pytest.mark.slow
def test_second_order_run_resumed_from_its_checkpoint_ends_as_uninterrupted(flwr, tmp_path):
    """Eight schools, second-order server: stopped after 2 Newton rounds, resumed in a new
    run (new node contexts), the Newton and PSIS rounds and the verdict as in one run."""
    from hbfl_pyro.flower import simulate

    options = {"seed": 3}
    whole = simulate(MODELS / "eight_schools.py", None, options)
    resumed = interrupted_then_resumed(tmp_path, "eight_schools.py", None, options, 2)
    assert_resumed_equals_uninterrupted(resumed, whole, 2)
    assert resumed["history"][-1]["phase"] == "psis"
    assert resumed["verdict"] == whole["verdict"]


@pytest.mark.slow
def test_closed_form_run_resumed_from_its_checkpoint_ends_as_uninterrupted(flwr, tmp_path):
    """Normal-Normal, closed-form server with 10 local steps a round and half the clients
    a round: the clients' local factors and optimiser states (on their nodes' state-dir)
    carry over, so the resumed run is the uninterrupted one bit for bit."""
    from hbfl_pyro.flower import simulate

    options = {"seed": 3, "local_steps": 10, "fraction": 0.5}
    whole = simulate(MODELS / "normal_normal.py", 4, options)
    resumed = interrupted_then_resumed(tmp_path, "normal_normal.py", 4, options, 2)
    assert_resumed_equals_uninterrupted(resumed, whole, 2)


@pytest.mark.slow
def test_secagg_run_resumed_from_its_checkpoint_ends_as_uninterrupted(flwr, tmp_path):
    """The same through SecAgg+: each FitIns of the resumed run tells its node to load its
    client's state; server and client states end as the uninterrupted run's, bit for bit.
    (A resume whose nodes lost their states is refused by the nodes, naming the
    state-dir.)"""
    from hbfl_pyro.flower import simulate

    secagg = {"secagg": True, "secagg-bound": 50.0, "secagg-elbo-bound": 1.0e4}
    options = {"seed": 3, "local_steps": 10}
    whole = simulate(MODELS / "normal_normal.py", 4, options, run_config=secagg)
    resumed = interrupted_then_resumed(tmp_path, "normal_normal.py", 4, options, 2, secagg)
    assert resumed["resumed_after"] == 2 and resumed["round"] == whole["round"] == 4
    # Flower's SecAgg+ quantises each secure sum with stochastic rounding, so no two runs
    # are equal bit for bit: summaries (bound 50 over a 2**32 modulus) move by ~1e-7 and
    # the ELBO's sum (bound 1e4) by ~5e-5 nats between two uninterrupted runs. A node that
    # restarted its client instead of loading its state would differ by whole local steps.
    assert_close(resumed["server"], whole["server"], "server")
    assert_close(resumed["clients"], whole["clients"], "clients")
    for theirs, ours in zip(resumed["history"], whole["history"]):
        assert theirs["clients"] == ours["clients"]
        assert abs(theirs["elbo"] - ours["elbo"]) < 1e-3, (theirs["round"], theirs, ours)


@pytest.mark.slow
def test_resume_refuses_another_fits_checkpoint_and_a_missing_state_dir(flwr, tmp_path):
    from hbfl_pyro.checkpoint import CheckpointError
    from hbfl_pyro.flower import simulate

    checkpoint = tmp_path / "server.pt"
    nodes = tmp_path / "nodes"
    options = {"seed": 3, "local_steps": 10}
    simulate(
        MODELS / "normal_normal.py",
        2,
        options,
        run_config={"checkpoint": str(checkpoint), "state-dir": str(nodes)},
    )
    # Other options: refused before any round, naming the option that differs.
    with pytest.raises(CheckpointError, match=r"options\['local_steps'\]: '10' in the checkpoint"):
        simulate(
            MODELS / "normal_normal.py",
            4,
            {**options, "local_steps": 5},
            run_config={"resume": str(checkpoint), "state-dir": str(nodes)},
        )
    # Without the nodes' state, the clients cannot continue: they refuse, naming why.
    with pytest.raises(Exception, match="no state-dir"):
        simulate(MODELS / "normal_normal.py", 4, options, run_config={"resume": str(checkpoint)})


@pytest.mark.slow
def test_cli_flower_sim_checkpoint_and_resume(flwr, tmp_path, capsys):
    """`hbfl fit --engine flower-sim --checkpoint F`, then `--resume F` with more rounds:
    the summary of the uninterrupted run, to the last digit; the nodes' states lie in
    ``F.nodes``."""
    from hbfl_pyro.cli import main

    checkpoint = tmp_path / "run.pt"
    args = ["fit", str(MODELS / "normal_normal.py"), "--engine", "flower-sim", "--seed", "3"]
    args += ["--local-steps", "10", "--fraction", "0.5", "--no-progress", "--no-report"]
    args += ["--num-samples", "200"]
    assert main(args + ["--rounds", "4", "--out", str(tmp_path / "whole")]) == 0
    part = ["--rounds", "2", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "part")]
    assert main(args + part) == 0
    assert (tmp_path / "run.pt.nodes").is_dir()
    capsys.readouterr()
    more = ["--rounds", "4", "--resume", str(checkpoint), "--checkpoint", str(checkpoint)]
    assert main(args + more + ["--out", str(tmp_path / "resumed")]) == 0
    assert "(after round 2)" in capsys.readouterr().out
    whole = (tmp_path / "whole" / "summary.csv").read_text()
    assert (tmp_path / "resumed" / "summary.csv").read_text() == whole
    # Another fit's checkpoint is refused before any round, naming what differs.
    assert main(args + ["--rounds", "4", "--resume", str(checkpoint), "--seed", "4"]) == 1
    err = capsys.readouterr().err
    assert "another model" in err and "options['seed']" in err, err
