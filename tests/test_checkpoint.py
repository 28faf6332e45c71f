"""Checkpoint and resume (evaluation.md §D): a restarted run continues exactly.

Every random choice is seeded by ``(seed, round, client)`` and all state is explicit, so
running R rounds in one go, or R/2 rounds, a checkpoint, a brand-new ``FederatedSVI``
built with the same arguments, a resume and R/2 more rounds, must give bit-identical
global and local parameters, optimiser states and ELBO history.
"""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import eight_schools
import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from hbfl_pyro.cli import main
from hbfl_pyro.dp import DPConfig

ROOT = Path(__file__).resolve().parents[1]

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


def _make(mode, seed=11, dp=None):
    model, load, options = CASES[mode]
    fit = FederatedSVI(model, load(), local_steps=2, seed=seed, dp=dp, **options)
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
        same_nan = isinstance(a, float) and isinstance(b, float) and a != a and b != b
        assert a == b or same_nan, f"{path}: {a!r} != {b!r}"


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
def test_a_dp_run_resumes_bit_for_bit(mode, tmp_path):
    """Differential privacy (the DifferentialPrivacy wrapper) keeps its account and its
    noise stream across a checkpoint: the resumed run equals the uninterrupted one exactly,
    noise, releases and epsilon included (the noise is reproducible here so that the two
    runs can be compared; a clip that binds, so the server's re-clipping matters too)."""
    clip = {"gradient": 0.05, "closed_form": 0.1}[mode]
    dp = DPConfig(clip=clip, noise_multiplier=1.0, reproducible_noise=True)
    uninterrupted = _make(mode, dp=dp)
    uninterrupted.run(ROUNDS, progress=False)
    first = _make(mode, dp=dp)
    first.run(ROUNDS // 2, progress=False)
    first.checkpoint(tmp_path / "dp.pt")
    resumed = _make(mode, dp=dp)
    resumed.resume(tmp_path / "dp.pt")
    assert resumed.server.dp_releases == ROUNDS // 2
    resumed.run(ROUNDS - ROUNDS // 2, progress=False)
    # as _assert_runs_equal, but every ELBO is NaN under DP (clients send none)
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    _assert_same(a["server"], b["server"], "server")  # with dp_releases and dp_accounting
    _assert_same(a["clients"], b["clients"], "clients")
    _assert_same(_history(uninterrupted), _history(resumed), "history")
    assert resumed.server.dp_releases == ROUNDS
    assert resumed.privacy == uninterrupted.privacy and resumed.privacy["rounds"] == ROUNDS
    assert [r["epsilon"] for r in resumed.history] == [dp.epsilon(t + 1) for t in range(ROUNDS)]


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
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == VERSION
    assert payload["fingerprint"] == fit.fingerprint()
    loaded = payload["state"]
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


# ---------------------------------------------------------------- safe checkpoint files
# (issue 14: loaded with weights_only=True, atomic, versioned, tied to one model)

SERVERS = {
    "gradient": lambda: _make("gradient"),
    "closed_form": lambda: _make("closed_form"),
    "closed_form+dp": lambda: FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=5),
        local_steps=1,
        seed=11,
        dp=DPConfig(clip=1.0, noise_multiplier=1.0),
    ),
    "second_order": lambda: FederatedSVI(
        eight_schools.noncentered, eight_schools.load_data(), seed=11, server="second_order"
    ),
}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_every_servers_checkpoint_loads_with_weights_only(server, tmp_path):
    fit = SERVERS[server]()
    for _ in range(2):
        fit.step()
    path = tmp_path / "state.pt"
    fit.checkpoint(path)
    # torch's safe loader reads the whole file: no pickled object other than containers
    payload = torch.load(path, weights_only=True)
    list(_walk(payload))
    _assert_same(payload["state"], fit.state_dict())
    resumed = SERVERS[server]()
    resumed.resume(path)
    _assert_same(resumed.state_dict(), fit.state_dict())


class _RunsCode:
    """Pickles as a call of ``exec``: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    fit = _make("closed_form")
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    # A file that looks like a checkpoint in every respect but its payload.
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fit.fingerprint(),
            "state": _RunsCode(marker),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="could run code") as info:
        fit.resume(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    assert fit.round == 0 and fit.history == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_truncated_or_corrupt_file_is_refused_with_the_librarys_message(damage, tmp_path):
    fit = _make("closed_form")
    fit.run(1, progress=False)
    path = tmp_path / "state.pt"
    fit.checkpoint(path)
    whole = path.read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "empty": b"", "text": b"not torch\n" * 9}
    path.write_bytes(damaged[damage])
    fresh = _make("closed_form")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        fresh.resume(path)
    assert str(path) in str(info.value)
    assert fresh.round == 0


def test_a_torch_file_that_is_not_a_checkpoint_or_is_newer_is_refused(tmp_path):
    fit = _make("closed_form")
    fit.run(1, progress=False)
    plain = tmp_path / "plain.pt"
    torch.save(fit.state_dict(), plain)  # the old format: a bare state, no version
    with pytest.raises(CheckpointError, match="not an hbfl_pyro checkpoint"):
        _make("closed_form").resume(plain)
    newer = tmp_path / "newer.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1, "fingerprint": {}, "state": {}}, newer)
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}.*upgrade hbfl_pyro"):
        _make("closed_form").resume(newer)


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path):
    data = eight_schools.load_data()
    noncentered = FederatedSVI(eight_schools.noncentered, data, local_steps=1, server="gradient")
    noncentered.run(1, progress=False)
    path = tmp_path / "noncentered.pt"
    noncentered.checkpoint(path)
    centered = FederatedSVI(eight_schools.centered, data, local_steps=1, server="gradient")
    with pytest.raises(CheckpointError, match="another model") as info:
        centered.resume(path)
    message = str(info.value)
    # the differing local site, both ways; the shared globals are not named
    assert "local sites['theta_trans']: [1] in the checkpoint, missing here" in message
    assert "local sites['theta']: missing in the checkpoint, [1] here" in message
    assert "'mu'" not in message
    assert centered.round == 0
    # the same model on other clients
    fewer = {name: data[name] for name in list(data)[:7]}
    other = FederatedSVI(eight_schools.noncentered, fewer, local_steps=1, server="gradient")
    with pytest.raises(CheckpointError, match=r"clients: \['A'.*'H'\] in the checkpoint"):
        other.resume(path)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    fit = _make("closed_form")
    fit.run(1, progress=False)
    path = tmp_path / "state.pt"
    fit.checkpoint(path)
    before = path.read_bytes()
    fit.run(1, progress=False)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            fit.checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert path.read_bytes() == before
    assert load_checkpoint(path)["round"] == 1
    # a state that would not load safely is refused before anything is written
    with pytest.raises(TypeError, match=r"state\['extra'\] is a object"):
        save_checkpoint({"extra": object()}, tmp_path / "other.pt", {})
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


# ---------------------------------------------------------------- hbfl fit, killed and resumed

CLI_ROUNDS = 16


def _hbfl_fit(out, *flags):
    return [
        sys.executable,
        "-m",
        "hbfl_pyro",
        "fit",
        "models/eight_schools.py",
        "--server",
        "first_order",
        "--rounds",
        str(CLI_ROUNDS),
        "--local-steps",
        "2",
        "--seed",
        "3",
        "--num-samples",
        "200",
        "--no-report",
        "--no-progress",
        "--out",
        str(out),
        *map(str, flags),
    ]


@pytest.mark.slow
def test_cli_fit_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    popen = dict(cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    whole_ck, killed_ck = tmp_path / "whole.pt", tmp_path / "killed.pt"
    started = []
    try:
        # The uninterrupted run and the one to be killed start together (2 cores).
        whole = subprocess.Popen(_hbfl_fit(tmp_path / "whole", "--checkpoint", whole_ck), **popen)
        started.append(whole)
        killed = subprocess.Popen(
            _hbfl_fit(tmp_path / "killed", "--checkpoint", killed_ck),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(killed)
        deadline = time.monotonic() + 120
        while not killed_ck.exists():  # written atomically: once it exists, it is whole
            assert killed.poll() is None, "the fit ended before it wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL  # it was still running
        at = load_checkpoint(killed_ck)["round"]
        assert 1 <= at < CLI_ROUNDS
        resumed = subprocess.run(
            _hbfl_fit(tmp_path / "resumed", "--checkpoint", killed_ck, "--resume", killed_ck),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        whole_out, whole_err = whole.communicate(timeout=180)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert whole.returncode == 0, whole_err
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed     {killed_ck} (after round {at})" in resumed.stdout
    # the same posterior, to the last digit: summary, final ELBO and the whole final state
    summary = (tmp_path / "whole" / "summary.csv").read_bytes()
    assert (tmp_path / "resumed" / "summary.csv").read_bytes() == summary
    final = f"final ELBO estimate (round {CLI_ROUNDS})"
    elbo = [line for line in whole_out.splitlines() if line.startswith(final)]
    assert elbo and elbo == [ln for ln in resumed.stdout.splitlines() if ln.startswith(final)]
    a, b = load_checkpoint(whole_ck), load_checkpoint(killed_ck)
    assert a["round"] == b["round"] == CLI_ROUNDS
    for record in a["history"] + b["history"]:
        record.pop("seconds")
    _assert_same(a, b)


def test_cli_resume_refuses_another_options_checkpoint(tmp_path, capsys):
    path = tmp_path / "state.pt"

    def fit(*flags):
        model = str(ROOT / "models" / "normal_normal.py")
        argv = ["fit", model, "--rounds", "1", "--no-report", "--no-progress"]
        return main(argv + ["--out", str(tmp_path / "out"), *map(str, flags)])

    assert fit("--local-steps", 2, "--checkpoint", path) == 0
    capsys.readouterr()
    assert fit("--local-steps", 3, "--resume", path) == 1
    err = capsys.readouterr().err
    assert err.startswith("hbfl: error: --resume:") and "another model" in err
    assert "options['local_steps']: '2' in the checkpoint, '3' here" in err
    assert fit("--local-steps", 2, "--seed", 5, "--resume", path) == 1
    assert "options['seed']: '0' in the checkpoint, '5' here" in capsys.readouterr().err
    assert fit("--local-steps", 2, "--resume", tmp_path / "missing.pt") == 1
    assert "no such file" in capsys.readouterr().err
    # the same options resume (one round was run, one is asked for: nothing left to run)
    assert fit("--local-steps", 2, "--resume", path) == 0
    assert "final ELBO estimate (round 1)" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["newton", "last round"])
def test_a_resumed_second_order_fit_equals_the_uninterrupted_one(where, tmp_path):
    """The second-order server's state (trial point, trust radius, accepted point, PSIS
    stages) and each client's Newton start resume exactly: interrupted after 2 Newton
    rounds, or before its last round (a PSIS round), it ends bit for bit as one run."""

    def make():
        return FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), seed=11)

    uninterrupted = make()
    assert uninterrupted.server.mode == "second_order"
    uninterrupted.run(progress=False)
    total = uninterrupted.round
    stop = 2 if where == "newton" else total - 1
    if where == "newton":
        assert uninterrupted.history[stop - 1]["phase"] == "newton"
    first = make()
    for _ in range(stop):
        first.step()
    path = tmp_path / "second_order.pt"
    first.checkpoint(path)
    resumed = make()
    resumed.resume(path)
    assert resumed.round == stop
    resumed.run(progress=False)
    _assert_same(uninterrupted.server.state_dict(), resumed.server.state_dict(), "server")
    for name in uninterrupted.clients:
        _assert_same(
            uninterrupted.clients[name].state_dict(), resumed.clients[name].state_dict(), name
        )
    _assert_same(_history(uninterrupted), _history(resumed), "history")
    assert uninterrupted.verdict == resumed.verdict
