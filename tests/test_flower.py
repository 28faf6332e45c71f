"""Flower engine: the same fit in Flower's simulation engine and in a loopback deployment.

Equivalence is exact (``torch.equal`` on every tensor of the server's and the clients'
states, ``==`` on every ELBO): the Flower apps build the server and each client as
:class:`~hbfl_pyro.FederatedSVI` does, every random choice is seeded by
``(seed, round, client)``, the records carry float64 bit for bit, and the server sums the
replies in the order it sent the messages (not the order they arrive), so both engines do
the same floating-point operations in the same order.

Every Flower/Ray process gets the network hygiene of :mod:`hbfl_pyro.flower.env` (set
here before ``flwr`` is imported); every process a test starts is stopped by PID.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tree_asserts import assert_same

from hbfl_pyro.flower.env import apply_network_hygiene, hygienic_env

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
APP = ROOT / "models" / "flower_app"
# Before flwr or ray is imported by anything in this process.
apply_network_hygiene(ROOT / ".flwr" / "tests")


@pytest.fixture(scope="module")
def flwr():
    return pytest.importorskip("flwr")


def in_process(spec, options, rounds, names=None, fail=None):
    """The reference: FederatedSVI in process, optionally on some clients only, with
    ``fail(name, round)`` making a client raise."""
    from hbfl_pyro import FederatedSVI
    from hbfl_pyro.modelfile import load_model_file

    mf = load_model_file(spec)
    data = mf.load_data()
    if names is not None:
        data = {n: data[n] for n in names}
    # Decays the file states over the run are spread over the rounds run, as Flower does.
    file_options = mf.options_for(rounds) if rounds is not None else dict(mf.options)
    fit = FederatedSVI(mf.model, data, **{**file_options, **options})
    if fail is not None:
        for name, client in fit.clients.items():
            client.update = _failing(client.update, name, fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.run(rounds, progress=False)
    return fit


def _failing(update, name, fail):
    def wrapped(message):
        if fail(name, message["round"]):
            raise ConnectionError(f"{name} is gone")
        return update(message)

    return wrapped


def assert_same_fit(fit, result, clients=True):
    assert result["names"] == list(fit.clients)
    assert [r["elbo"] for r in result["history"]] == [r["elbo"] for r in fit.history]
    for theirs, ours in zip(result["history"], fit.history):
        for key in ("round", "clients", "failed", "updated"):
            assert theirs[key] == ours[key], (key, theirs, ours)
    assert_same(fit.server.state_dict(), result["server"], "server")
    if clients:
        for name, client in fit.clients.items():
            assert_same(client.state_dict(), result["clients"][name], name)


# ---------------------------------------------------------------------- records
def test_records_round_trip_exactly(flwr):
    from hbfl_pyro.flower.records import decode, record_dict

    fit = in_process(MODELS / "eight_schools.py", {"seed": 1, "server": "gradient"}, 3)
    client = fit.clients["A"]
    state = client.state_dict()
    back = decode(record_dict(state))
    assert_same(state, back)
    # Keys keep their type (Adam's state is keyed by parameter index), tuples stay tuples.
    assert set(back["optim"]["state"]) == {0, 1}
    assert isinstance(back["optim"]["param_groups"][0]["betas"], tuple)
    message = fit.server.message(4, "A")
    assert_same(message, decode(record_dict(message)))
    reply = {"elbo": float("nan"), "x": torch.tensor(1.0 / 3.0), "n": [1, (2, None)]}
    got = decode(record_dict(reply))
    assert got["elbo"] != got["elbo"] and got["n"] == [1, (2, None)]
    assert got["x"].shape == () and got["x"].item() == 1.0 / 3.0


def test_the_example_app_declares_every_run_config_key():
    """``flwr run`` refuses a run-config key the app's pyproject.toml does not declare, so
    the example app declares every key the apps read, with the same defaults."""
    import tomllib

    from hbfl_pyro.flower.config import RUN_CONFIG_DEFAULTS

    text = (MODELS / "flower_app" / "pyproject.toml").read_text()
    declared = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RUN_CONFIG_DEFAULTS)
    for key, default in RUN_CONFIG_DEFAULTS.items():
        assert declared[key] == default, key


def test_run_config_guide_chooses_the_family_and_its_settings(flwr):
    """The run-config key ``guide`` (``flwr run --run-config "guide='structured'"``) loads
    the model file with that family and the file's ``guide_options`` for it."""
    from hbfl_pyro import StructuredLocalNormal
    from hbfl_pyro.flower.apps import load_spec, merged_config

    model_file = str(MODELS / "surgical.py")
    # (The file's default is the second-order server; its first-order settings are those
    # of the mean-field family.)
    plain = load_spec(merged_config({"model-file": model_file, "guide": "mean-field"}, None))
    assert plain.rounds == 500 and plain.options.get("local_guide", "auto") == "auto"
    spec = load_spec(merged_config({"model-file": model_file, "guide": "structured"}, None))
    assert spec.rounds == 1500  # surgical.guide_options["structured"]
    assert spec.options["local_guide"] is StructuredLocalNormal
    assert spec.options["server"] == "gradient"
    assert spec.options["lr_decay"] ** 1500 == pytest.approx(0.01)  # spread over the run


def test_missing_flower_names_the_extra(monkeypatch, capsys):
    from hbfl_pyro.cli import main
    from hbfl_pyro.flower import INSTALL_HINT, require_flower

    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now fails
    with pytest.raises(ImportError, match=r"hbfl_pyro\[flower\]"):
        require_flower()
    status = main(
        ["fit", str(MODELS / "eight_schools.py"), "--engine", "flower-sim", "--no-progress"]
    )
    assert status == 1
    assert INSTALL_HINT in capsys.readouterr().err


# ---------------------------------------------------------------------- simulation
@pytest.mark.slow
@pytest.mark.parametrize(
    "model, options, rounds",
    [
        # Closed form (Normal-Normal family), every client every round.
        ("normal_normal.py", {"seed": 3, "local_steps": 10}, 3),
        # Gradient mode (phi in the likelihood), half the clients a round.
        ("eight_schools.py", {"seed": 3, "fraction": 0.5}, 4),
    ],
)
def test_simulation_equals_in_process(flwr, model, options, rounds):
    from hbfl_pyro.flower import simulate

    result = simulate(MODELS / model, rounds, options)
    fit = in_process(MODELS / model, options, rounds)
    assert_same_fit(fit, result)
    assert all(not r["failed"] for r in result["history"])
    # Payload of every message: global-sized (a few hundred bytes to 1 kB here).
    for t in result["traffic"]:
        assert max(t["bytes_down"] + t["bytes_up"]) < 2000


@pytest.mark.slow
def test_second_order_simulation_equals_in_process(flwr):
    """The default server of eight schools (second order) runs in Flower's simulation as
    in process, round for round: Newton rounds, the PSIS rounds, the verdict, bit for bit
    (the ServerApp runs FederatedSVI.run itself; only the engine differs)."""
    from hbfl_pyro.flower import simulate

    options = {"seed": 3}
    result = simulate(MODELS / "eight_schools.py", None, options)
    fit = in_process(MODELS / "eight_schools.py", {**options, "engine": "inprocess"}, None)
    assert fit.server.mode == "second_order"
    assert result["server_choice"] == fit.server_choice
    assert_same_fit(fit, result)
    phases = [r["phase"] for r in result["history"]]
    assert phases[0] == "newton" and phases[-1] == "psis", phases
    assert result["verdict"]["status"] == "converged"
    assert result["verdict"]["k_hat"] == fit.verdict["k_hat"]
    # Messages are global-sized: a Hessian of the 10 globals down, or 3000 PSIS draws of
    # them (the largest, 240 kB), never data.
    biggest = max(max(t["bytes_down"] + t["bytes_up"]) for t in result["traffic"])
    assert biggest < 10 * 3000 * 8 + 5000, biggest


@pytest.mark.slow
def test_cli_flower_sim_runs_the_second_order_server(flwr, tmp_path):
    """`hbfl fit --engine flower-sim` on the default (second-order) server: the same
    summary as in process."""
    from hbfl_pyro.cli import main

    args = ["fit", str(MODELS / "eight_schools.py"), "--seed", "2", "--no-progress"]
    args += ["--num-samples", "500", "--no-report"]
    assert main(args + ["--engine", "flower-sim", "--out", str(tmp_path / "flower")]) == 0
    assert main(args + ["--engine", "inprocess", "--out", str(tmp_path / "inprocess")]) == 0
    flower = (tmp_path / "flower" / "summary.csv").read_text()
    assert flower == (tmp_path / "inprocess" / "summary.csv").read_text()


@pytest.mark.slow
def test_cli_flower_sim_writes_the_in_process_summary(flwr, tmp_path):
    from hbfl_pyro.cli import build_parser, main

    args = ["fit", str(MODELS / "eight_schools.py"), "--rounds", "3", "--fraction", "0.5"]
    args += ["--seed", "2", "--no-progress", "--num-samples", "500"]
    try:  # the report flags are another issue's; skip the report when they exist
        build_parser().parse_args(args + ["--no-report"])
        args.append("--no-report")
    except SystemExit:
        pass
    assert main(args + ["--engine", "flower-sim", "--out", str(tmp_path / "flower")]) == 0
    assert main(args + ["--out", str(tmp_path / "inprocess")]) == 0
    flower = (tmp_path / "flower" / "summary.csv").read_text()
    inproc = (tmp_path / "inprocess" / "summary.csv").read_text()
    assert flower == inproc
    assert len(list(csv.DictReader(flower.splitlines()))) == 2 + 8 + 8


# ---------------------------------------------------------------------- deployment
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list:
    children, out, stack = _children(), [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(pids) -> set:
    """``(address hex, port)`` of every TCP socket the processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.add((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


class Deployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, each started (and stopped) by PID."""

    def __init__(self, tmp_path: Path, num_nodes: int = 3):
        self.dir = tmp_path
        self.env = hygienic_env(flwr_home=tmp_path / "flwr-home")
        self.env["OMP_NUM_THREADS"] = "1"
        self.bin = Path(sys.executable).parent
        # The SuperLink and SuperNodes start Flower's other programs by name.
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.port = _free_port()
        self.num_nodes = num_nodes
        self.procs = {}

    def _start(self, name, args):
        log = open(self.dir / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            [str(self.bin / args[0])] + args[1:],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.dir,
        )
        log.close()

    def __enter__(self):
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "hbfl-test"\n\n[superlink.hbfl-test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            self._start(
                "superlink",
                ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                 str(self.port), "--disable-runtime-dependency-installation"],
            )  # fmt: skip
            self._wait_for_port(self.port, 60)
            for i in range(self.num_nodes):
                self._start(
                    f"node{i}",
                    ["flower-supernode", "--insecure", "--superlink",
                     f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port",
                     str(_free_port()), "--node-config",
                     f"partition-id={i} num-partitions={self.num_nodes}"],
                )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_port(self, port, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")

    def pids(self):
        pids = []
        for proc in self.procs.values():
            pids += [proc.pid] + _descendants(proc.pid)
        return pids

    def flwr_run(self, run_config: dict, app: Path = APP):
        """``flwr run`` of ``app`` (the core's app by default) with ``run_config``."""
        text = " ".join(
            f"{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}"
            for k, v in run_config.items()
        )
        done = subprocess.run(
            [str(self.bin / "flwr"), "run", str(app), "hbfl-test", "--run-config", text],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def kill(self, name, sig=signal.SIGKILL):
        """Kill one started process and everything it started, by PID."""
        proc = self.procs.pop(name)
        _signal([proc.pid] + _descendants(proc.pid), sig)
        proc.wait(timeout=30)

    def stop(self):
        for name in list(self.procs):
            proc = self.procs.pop(name)
            family = [proc.pid] + _descendants(proc.pid)
            _signal(family, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _signal([p for p in family if _alive(p)], signal.SIGKILL)
            proc.wait(timeout=15)

    def __exit__(self, *exc):
        self.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(self.dir.glob("*.log"))
        )


def _wait_for(path: Path, timeout: float, deployment, ready=lambda p: True):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            try:
                if ready(path):
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.5)
    raise TimeoutError(f"{path} not written in {timeout} s\n{deployment.logs()}")


#: Settings under which 3 rounds of Normal-Normal reach the mean-field optimum (moment-
#: matched client objectives are exact here, so what remains is optimiser error).
DEPLOY_OPTIONS = {
    "seed": 3,
    "local_steps": 300,
    "local_lr": 0.1,
    "local_lr_decay": 0.65,
    "num_particles": 2,
    "moment_matched": True,
}
NAMES = ["client00", "client01", "client02"]


def _run_config(out, rounds, options, **extra):
    config = {
        "model-file": str(MODELS / "normal_normal.py"),
        "rounds": rounds,
        "num-clients": 3,
        "out-dir": str(out),
        "options": json.dumps(options),
    }
    config.update(extra)
    return config


@pytest.mark.slow
def test_deployment_on_loopback(flwr, tmp_path):
    import normal_normal

    out = tmp_path / "out"
    with Deployment(tmp_path) as deployment:
        deployment.flwr_run(_run_config(out, 3, DEPLOY_OPTIONS))
        # Only loopback: every socket the SuperLink and SuperNodes listen on.
        listening = _listening(deployment.pids())
        assert listening and all(address in LOOPBACK for address, _ in listening), listening
        _wait_for(out / "result.pt", 240, deployment)
        started = deployment.pids()
    time.sleep(1.0)
    assert not [p for p in started if _alive(p)], "a process outlived the deployment"
    result = torch.load(out / "result.pt", weights_only=False)
    assert sorted(result["nodes"]) == NAMES
    fit = in_process(MODELS / "normal_normal.py", DEPLOY_OPTIONS, 3, names=NAMES)
    assert_same_fit(fit, result, clients=False)
    # The posterior: q(mu) at the analytic mean-field optimum of these three clients.
    optimum = normal_normal.mean_field_optimum(fit.data.as_dict())
    mean, sd = optimum["mu"]
    q = result["server"]["family_params"]
    assert abs(float(q["loc"]) - float(mean)) < 1e-3 * float(sd)
    assert abs(float(q["scale"]) / float(sd) - 1) < 1e-3


@pytest.mark.slow
def test_second_order_deployment_on_loopback(flwr, tmp_path):
    """The second-order server across a SuperLink and three SuperNodes (eight schools'
    first three schools): the same fit as in process, bit for bit."""
    out = tmp_path / "out"
    options = {"seed": 3}
    config = _run_config(out, -1, options, **{"model-file": str(MODELS / "eight_schools.py")})
    with Deployment(tmp_path) as deployment:
        deployment.flwr_run(config)
        _wait_for(out / "result.pt", 240, deployment)
    result = torch.load(out / "result.pt", weights_only=False)
    assert result["server_choice"]["server"] == "second_order"
    names = ["A", "B", "C"]
    fit = in_process(MODELS / "eight_schools.py", {**options, "engine": "inprocess"}, None, names)
    assert_same_fit(fit, result, clients=False)
    assert result["verdict"] == fit.verdict


@pytest.mark.slow
def test_deployment_resumes_from_its_checkpoint(flwr, tmp_path):
    """A deployment's ServerApp stopped after round 1 and started again by a second
    ``flwr run`` with ``resume``: the clients continue from the states their nodes kept
    (state-dir; they never left the nodes), and the run ends as an uninterrupted 3-round
    fit in process does, bit for bit."""
    first, second = tmp_path / "first", tmp_path / "second"
    checkpoint, states = tmp_path / "server.ckpt", tmp_path / "node-states"
    keep = {"state-dir": str(states)}
    with Deployment(tmp_path) as deployment:
        stopped = {**keep, "checkpoint": str(checkpoint), "stop-after-round": 1}
        deployment.flwr_run(_run_config(first, 3, DEPLOY_OPTIONS, **stopped))
        _wait_for(first / "result.pt", 240, deployment)
        assert torch.load(first / "result.pt", weights_only=False)["round"] == 1
        deployment.flwr_run(_run_config(second, 3, DEPLOY_OPTIONS, resume=str(checkpoint), **keep))
        _wait_for(second / "result.pt", 240, deployment)
    result = torch.load(second / "result.pt", weights_only=False)
    fit = in_process(MODELS / "normal_normal.py", DEPLOY_OPTIONS, 3, names=NAMES)
    assert_same_fit(fit, result, clients=False)


@pytest.mark.slow
def test_deployment_survives_a_killed_supernode(flwr, tmp_path):
    out = tmp_path / "out"
    options = {**DEPLOY_OPTIONS, "min_clients": 2}

    def one_round_done(path):
        return len(json.loads(path.read_text())["history"]) >= 1

    with Deployment(tmp_path) as deployment:
        deployment.flwr_run(_run_config(out, 2, options, **{"round-timeout": 60.0}))
        _wait_for(out / "history.json", 240, deployment, one_round_done)
        deployment.kill("node2")  # SIGKILL: a crash, no goodbye to the SuperLink
        _wait_for(out / "result.pt", 240, deployment)
    result = torch.load(out / "result.pt", weights_only=False)
    first, second = result["history"]
    assert first["clients"] == NAMES and not first["failed"]
    # The fit went on with the two remaining clients and says who failed and why.
    assert second["clients"] == NAMES[:2] and second["failed"] == ["client02"]
    assert second["updated"] and "client02" in second["errors"]
    # The same as in process when client02 fails in round 2 (stale participation keeps
    # its round-1 summary in the server's sums, in both engines).
    fit = in_process(
        MODELS / "normal_normal.py",
        options,
        2,
        names=NAMES,
        fail=lambda name, r: name == "client02" and r >= 2,
    )
    assert_same_fit(fit, result, clients=False)
