"""Client-level differential privacy of deep FedHB (``FedHB(..., dp=DPConfig(...))``,
:class:`hbfl_pyro.servers.FamilyDifferentialPrivacy`).

What is checked, and why it can fail:

- with ``noise_multiplier=0`` and a clip no update reaches, the run is the non-private
  one bit for bit (the clipping, the noise path and the accounting change nothing else);
- a binding clip changes the run; every reply a client sends is within ``clip`` of the
  ``m0`` it was sent, and one client's contribution to the update of ``m0`` is at most
  ``w_i clip / (lambda0 + N)`` however far its reply is (the server re-clips);
- the noise has the stated standard deviation ``z sqrt(2) clip max_i w_i``;
- the epsilon in every record is the accountant's (:mod:`hbfl_pyro.dp`) for the rounds
  released;
- a DP run stopped after round k and resumed (state dict or checkpoint file) is the
  uninterrupted run bit for bit (reproducible noise), and a checkpoint of a non-private
  run is refused;
- what cannot work is refused, naming the fix.
"""

import math

import pytest
import torch
from deep_toys import OPTS, toy

from hbfl_pyro import DPConfig, NIWDiag, NIWFull, NIWIso
from hbfl_pyro import dp as dp_module
from hbfl_pyro.deep import FedHB, FedHBMixture, FlatNet, diag_prior, iso_prior
from hbfl_pyro.servers import DifferentialPrivacy, FamilyDifferentialPrivacy, FamilyServer
from hbfl_pyro.servers.closed_form import MixtureServer

PRIORS = {"iso": iso_prior, "diag": diag_prior}


def make(net, clients, kind="diag", **kw):
    fam = PRIORS[kind](FlatNet(net).vector(), prox_weight=2.0)
    return FedHB(net, clients, fam, eps=0.1, **{**OPTS, **kw})


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def without(history, *keys):
    return [{k: v for k, v in r.items() if k not in ("seconds", *keys)} for r in history]


@pytest.mark.parametrize("weighting", ["equal", "size"])
@pytest.mark.parametrize("kind", ["iso", "diag"])
def test_zero_noise_and_a_clip_never_reached_give_the_non_dp_run_exactly(kind, weighting):
    net, clients = toy()
    plain = make(net, clients, kind, weighting=weighting)
    private = make(
        net, clients, kind, weighting=weighting, dp=DPConfig(clip=1e6, noise_multiplier=0.0)
    )
    plain.run(4)
    private.run(4)
    assert same(private.global_weights(), plain.global_weights())
    assert same(private.params, plain.params)
    assert same(without(private.history, "epsilon", "delta"), without(plain.history))
    assert all(r["epsilon"] == math.inf for r in private.history)  # z = 0: no privacy


def test_a_binding_clip_changes_the_run_and_bounds_every_reply():
    net, clients = toy()
    clip = 0.05
    sent, replies = {}, []

    def hook(direction, client, message):
        if direction == "down":
            sent[message["round"], client] = message["family_params"]["m0"]
        else:
            replies.append((message["round"], client, message["m"]))

    private = make(net, clients, dp=DPConfig(clip=clip, noise_multiplier=0.0), on_message=hook)
    plain = make(net, clients)
    private.run(3)
    plain.run(3)
    assert not torch.equal(private.global_weights(), plain.global_weights())
    norms = [float((m - sent[r, i]).norm()) for r, i, m in replies]
    assert len(norms) == sum(len(r["clients"]) for r in private.history)
    assert max(norms) <= clip * (1 + 1e-12)
    assert sum(n > 0.99 * clip for n in norms) >= len(norms) // 2  # the clip did bind


@pytest.mark.parametrize("weighting", ["equal", "size"])
def test_the_server_bounds_each_clients_contribution(weighting):
    clip, lambda0 = 0.3, 1e-3
    fam = NIWIso(3, lambda0=lambda0)
    names = ["a", "b", "c"]

    def server():
        return FamilyDifferentialPrivacy(
            FamilyServer(fam, names, eps=0.1, weighting=weighting, sizes=[10, 20, 30]),
            DPConfig(clip=clip, noise_multiplier=0.0),
        )

    base = server()
    m0 = base.family_params["m0"].clone()
    honest = {"a": m0 + 0.01, "b": m0 - 0.02}
    w = base.multiplicities(names, m0)
    base.aggregate(1, {**honest, "c": m0})  # client c did not move: the zero update
    for far in (1.0, 1e3, 1e9):  # however far client c goes
        fit = server()
        fit.aggregate(1, {**honest, "c": m0 + far * torch.tensor([1.0, -2.0, 0.5])})
        moved = float((fit.family_params["m0"] - base.family_params["m0"]).norm())
        bound = float(w[2]) * clip / (lambda0 + 3)
        assert moved == pytest.approx(bound, rel=1e-6)  # at most, and reached: it is clipped


@pytest.mark.parametrize("kind", ["iso", "diag"])
def test_the_noise_has_the_stated_standard_deviation(kind):
    z, clip, d = 0.7, 0.2, 400
    fam = NIWIso(d, lambda0=1e-3) if kind == "iso" else NIWDiag(d, lambda0=1e-3)
    sizes = [10, 20, 30, 40]
    server = FamilyDifferentialPrivacy(
        FamilyServer(fam, list(range(4)), eps=0.1, weighting="size", sizes=sizes),
        DPConfig(clip=clip, noise_multiplier=z, reproducible_noise=True),
    )
    m0 = torch.full((d,), 3.0, dtype=torch.float64)
    far = 1e9 * torch.ones(() if kind == "iso" else (d,), dtype=torch.float64)
    sums = {
        "sum_m": 4 * m0,
        "sum_mm": far,  # far from the projection's bound
        "count": torch.tensor(4.0, dtype=torch.float64),
    }
    largest = 4 * 40 / 100  # the largest multiplicity, N n_i / sum_j n_j
    first, second = [], []
    for seed in range(50):
        noisy = server._noisy(sums, m0, largest, seed)
        n1 = noisy["sum_m"] - sums["sum_m"]
        first.append(n1)
        # sum_mm's noise: 2 m0 n1 (the first part, post-processed) + clip n2.
        cross = m0 * n1 if kind == "diag" else (m0 * n1).sum()
        second.append(((noisy["sum_mm"] - sums["sum_mm"] - 2 * cross) / clip).reshape(-1))
    std = z * math.sqrt(2) * clip * largest
    assert float(torch.cat(first).std()) == pytest.approx(std, rel=0.03)  # 0.5% s.e.
    # iso: 50 draws of one number (10% standard error); diag: 20,000 (0.5%).
    assert float(torch.cat(second).std()) == pytest.approx(std, rel=0.35 if kind == "iso" else 0.03)


@pytest.mark.parametrize("accountant", ["gdp", "zcdp"])
def test_the_reported_epsilon_is_the_accountants(accountant):
    net, clients = toy()
    cfg = DPConfig(clip=0.1, noise_multiplier=1.3, delta=1e-6, accountant=accountant)
    fit = make(net, clients, dp=cfg)
    fit.run(3)
    for r, record in enumerate(fit.history, start=1):
        assert record["epsilon"] == dp_module.epsilon(1.3, r, 1e-6, accountant)
        assert record["epsilon"] == cfg.epsilon(r) and record["delta"] == 1e-6
    assert fit.server.dp_releases == 3
    assert fit.privacy == cfg.report(3)
    assert make(net, clients).privacy is None


def test_a_resumed_dp_run_equals_the_uninterrupted_one(tmp_path):
    net, clients = toy()
    cfg = DPConfig(clip=0.05, noise_multiplier=1.0, reproducible_noise=True)
    rounds = 5
    whole = make(net, clients, dp=cfg, start="own")
    whole.run(rounds)
    for stop in (1, 3):
        first = make(net, clients, dp=cfg, start="own")
        first.run(stop)
        state = first.state_dict()
        assert state["server"]["dp_releases"] == stop
        first.checkpoint(tmp_path / "ckpt")
        for how in ("state", "file"):
            resumed = make(net, clients, dp=cfg, start="own")
            if how == "state":
                resumed.load_state_dict(state)
            else:
                resumed.resume(tmp_path / "ckpt")
            resumed.run(rounds - stop)
            assert same(resumed.global_weights(), whole.global_weights()), (stop, how)
            assert same(resumed.params, whole.params), (stop, how)
            assert same(without(resumed.history), without(whole.history)), (stop, how)
            assert same(resumed.state_dict()["server"], whole.state_dict()["server"])
    # Fresh noise (the default) differs from run to run.
    a, b = (make(net, clients, dp=DPConfig(clip=0.05, noise_multiplier=1.0)) for _ in "ab")
    a.run(1)
    b.run(1)
    assert not torch.equal(a.global_weights(), b.global_weights())


def test_checkpoints_keep_the_account():
    net, clients = toy()
    cfg = DPConfig(clip=0.05, noise_multiplier=1.0, reproducible_noise=True)
    plain = make(net, clients)
    plain.run(1)
    with pytest.raises(ValueError, match="without differential privacy"):
        make(net, clients, dp=cfg).load_state_dict(plain.state_dict())
    private = make(net, clients, dp=cfg)
    private.run(1)
    other = DPConfig(clip=0.05, noise_multiplier=2.0)
    with pytest.raises(ValueError, match="epsilon would be misreported"):
        make(net, clients, dp=other).load_state_dict(private.state_dict())


def test_the_budget_of_a_target_epsilon_is_enforced_before_training():
    net, clients = toy()
    cfg = DPConfig(clip=0.05, target_epsilon=5.0, rounds=2)
    fit = make(net, clients, dp=cfg)
    fit.run(2)
    assert fit.history[-1]["epsilon"] <= 5.0
    with pytest.raises(RuntimeError, match="exceed the privacy budget"):
        fit.step()
    assert fit.round == 2


def test_what_cannot_work_is_refused_naming_the_fix():
    net, clients = toy()
    cfg = DPConfig(clip=0.1, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="participation='scaled'"):
        make(net, clients, dp=cfg, participation="stale")
    d = FlatNet(net).d
    with pytest.raises(ValueError, match="NIWIso or NIWDiag"):
        FedHB(net, clients, NIWFull(d), eps=0.1, dp=cfg, **OPTS)
    with pytest.raises(TypeError, match="DPConfig"):
        make(net, clients, dp={"clip": 0.1})
    mixture = MixtureServer([NIWIso(2)], ["a", "b"])
    with pytest.raises(TypeError, match="mixture has no differential privacy"):
        FamilyDifferentialPrivacy(mixture, cfg)  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match=r"FedHB\(\.\.\., dp="):
        FedHBMixture(net, clients, [iso_prior(FlatNet(net).vector())], dp=cfg)
    with pytest.raises(TypeError, match="wrap it in FamilyDifferentialPrivacy"):
        DifferentialPrivacy(FamilyServer(NIWIso(2), ["a", "b"]), cfg)  # type: ignore[arg-type]
    # Secure aggregation: the server could not re-clip each update.
    server = FamilyDifferentialPrivacy(FamilyServer(NIWIso(2), ["a", "b"]), cfg)
    with pytest.raises(NotImplementedError, match="secure aggregation"):
        server.sum_layout(1)
    assert isinstance(server, DifferentialPrivacy)  # the core wrapper's reads and state
