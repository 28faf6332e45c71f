"""FedHB for networks: the fast torch path is the Pyro hierarchy, vmap equals the loop,
participation/weighting do what they say, and the prox weight does not grow with ``d``.

All in float64 (conftest). Tolerances: the compared computations are the same
mathematics in a different order of floating-point operations (summation order inside a
minibatch, batched vs plain matrix products, a rescaled objective), so they agree to a few
ulps per operation; 1e-10 absolute on weights of order 0.1-1 after tens of optimiser steps
leaves a margin of about 1e4 over the differences observed (about 1e-14).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoDelta

from hbfl_pyro import FederatedSVI, NIWFull, NIWIso
from hbfl_pyro.deep import (
    FedHB,
    FlatNet,
    LocalSpec,
    client_objective,
    diag_prior,
    iso_prior,
    mlp,
    network_model,
    partition,
    prox_weight,
    train_loop,
    train_vmap,
)
from hbfl_pyro.deep.data import load_mnist
from hbfl_pyro.deep.local import QuadraticPenalty, batch_schedule, client_loss
from hbfl_pyro.guides import private_params

TOL = 1e-10


@pytest.fixture(scope="module")
def small_mnist():
    """MNIST test images average-pooled to 7x7 (49 features), first 1,200 images."""
    from conftest import SHARED_DATA

    x, y = load_mnist(SHARED_DATA / "mnist_t10k")
    x = F.avg_pool2d(x[:1200], 4).to(torch.float64)
    return x, y[:1200]


def tiny_net(seed=0, sizes=(49, 12, 10)):
    torch.manual_seed(seed)
    return mlp(sizes).to(torch.float64)


# --------------------------------------------------------------------------------------
# vmap == loop
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        LocalSpec(epochs=2, batch_size=16, lr=0.1),
        LocalSpec(epochs=2, batch_size=16, lr=0.05, momentum=0.9),
        LocalSpec(epochs=2, batch_size=16, lr=0.01, optimizer="adam"),
        LocalSpec(epochs=1, batch_size=16, lr=0.01, optimizer="adam", normalise=False),
    ],
    ids=["sgd", "momentum", "adam", "adam-summed"],
)
def test_vmap_equals_loop(small_mnist, spec, report):
    x, y = small_mnist
    split = partition(
        x, y, dirichlet="class", num_clients=5, num_new_clients=0, global_test=100, seed=0
    )
    data = [(c.x_train, c.y_train) for c in split.clients]
    sizes = [len(d[1]) for d in data]
    assert len(set(sizes)) == len(sizes)  # unequal: clients finish at different steps
    net = FlatNet(tiny_net())
    fam = iso_prior(net.vector(), prox_weight=30.0)
    params = fam.init_params()
    params["m0"] = params["m0"] + 0.05  # the prox pulls somewhere else than the start

    def penalty(theta, n):
        return -fam.expected_log_prior(theta, params)

    schedules = [
        batch_schedule(n, spec.batch_size, spec.epochs, seed=i) for i, n in enumerate(sizes)
    ]
    starts = net.vector() + 0.01 * torch.randn(len(data), net.d)
    loop = train_loop(net, starts, data, schedules, spec, penalty)
    fast = train_vmap(net, starts, data, schedules, spec, penalty)
    chunked = train_vmap(net, starts, data, schedules, spec, penalty, chunk_size=2)
    diff = float((loop - fast).abs().max())
    report(f"deep vmap vs loop ({spec.optimizer}, momentum {spec.momentum}): max |diff| {diff:.1e}")
    assert float((loop - starts).abs().max()) > 1e-2  # training moved the weights
    assert diff < TOL
    assert float((chunked - fast).abs().max()) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diag", "fedprox"])
def test_quadratic_penalty_fast_path_equals_autograd(small_mnist, kind):
    """The engines add a QuadraticPenalty's gradient in place; wrapped in a plain function
    the same penalty goes through autograd. Same result, both engines."""
    x, y = small_mnist
    split = partition(
        x, y, dirichlet="class", num_clients=4, num_new_clients=0, global_test=100, seed=2
    )
    data = [(c.x_train, c.y_train) for c in split.clients]
    net = FlatNet(tiny_net())
    g = torch.Generator().manual_seed(0)
    if kind == "diag":
        fam = diag_prior(net.vector(), prox_weight=10.0)
        params = fam.init_params()
        params["b"] = params["b"] * (0.5 + torch.rand(net.d, generator=g))  # varied a / b
        quad = FedHB(net.net, data, fam).penalty(params)
        theta = net.vector() + torch.randn(net.d, generator=g)
        assert torch.allclose(quad(theta, 3.0), -fam.expected_log_prior(theta, params))
    else:
        quad = QuadraticPenalty(net.vector() + 0.1, 0.7, per_example=True)
    assert isinstance(quad, QuadraticPenalty)

    def plain(theta, n):
        return quad(theta, n)

    spec = LocalSpec(epochs=2, batch_size=16, lr=0.05, momentum=0.5)
    schedules = [batch_schedule(len(d[1]), 16, 2, seed=i) for i, d in enumerate(data)]
    start = net.vector()
    slow = train_loop(net, start, data, schedules, spec, plain)
    for fast in (
        train_loop(net, start, data, schedules, spec, quad),
        train_vmap(net, start, data, schedules, spec, quad),
    ):
        assert float((fast - slow).abs().max()) < TOL
    assert float((slow - train_loop(net, start, data, schedules, spec)).abs().max()) > 1e-3


def test_fedhb_engines_agree(small_mnist):
    x, y = small_mnist
    split = partition(x, y, num_clients=6, num_new_clients=0, global_test=100, seed=1)
    net = tiny_net()
    fam = iso_prior(FlatNet(net).vector(), prox_weight=5.0)
    runs = {}
    for engine in ("inprocess", "vectorised"):
        fit = FedHB(
            net,
            split.clients,
            fam,
            eps=0.05,
            fraction=0.5,
            engine=engine,
            seed=2,
            local=LocalSpec(epochs=1, batch_size=16, lr=0.1),
        )
        fit.run(3)
        runs[engine] = fit
    a, b = runs["inprocess"].params, runs["vectorised"].params
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-12, atol=TOL), key
    chosen = [r["clients"] for r in runs["inprocess"].history]
    assert chosen == [r["clients"] for r in runs["vectorised"].history]
    assert all(len(set(c)) == 3 for c in chosen) and len({tuple(c) for c in chosen}) > 1


# --------------------------------------------------------------------------------------
# The fast path is the Pyro hierarchy's client block
# --------------------------------------------------------------------------------------


def _pyro_clients(seed=0, sizes=(5, 7, 4)):
    g = torch.Generator().manual_seed(seed)
    return {
        f"c{i}": {"x": torch.randn(n, 3, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}
        for i, n in enumerate(sizes)
    }


def _posterior(fam, d, seed=1):
    """A non-trivial q(phi): the family's update from random client summaries."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        fam.client_summary(0.3 * torch.randn(d, generator=g), torch.full((d,), 0.01))
        for _ in range(4)
    ]
    return fam.server_update({k: sum(p[k] for p in parts) for k in parts[0]}, 4)


def _set_delta(client, theta):
    with private_params(), torch.no_grad():
        (param,) = list(client.local_guide.parameters())
        param.copy_(theta.reshape(param.shape))


@pytest.mark.parametrize("kind", ["iso", "diag"])
def test_pyro_client_block_is_the_torch_objective(kind):
    net = FlatNet(tiny_net(sizes=(3, 4, 3)))
    init = net.vector()
    fam = (iso_prior if kind == "iso" else diag_prior)(init, prox_weight=3.0, pseudo_clients=4.0)
    params = _posterior(fam, net.d)
    clients = _pyro_clients()
    fit = FederatedSVI(network_model(net, fam), clients, server=fam, local_guide=AutoDelta)
    fit.server.family_params = params
    fedhb = FedHB(net.net, [(c["x"], c["y"]) for c in clients.values()], fam)
    penalty = fedhb.penalty(params)
    g = torch.Generator().manual_seed(5)
    for name, data in clients.items():
        theta = init + 0.2 * torch.randn(net.d, generator=g)
        client = fit.clients[name]
        _set_delta(client, theta)
        with private_params():
            (param,) = list(client.local_guide.parameters())
            value = -client._terms(fit.server.message(1, name), 1).sum()
            (grad_pyro,) = torch.autograd.grad(value, param)
        t = theta.clone().requires_grad_(True)
        direct = client_objective(net, t, data["x"], data["y"], fam, params)
        (grad_direct,) = torch.autograd.grad(direct, t)
        # The training path: one full batch, summed scale, the family's penalty.
        t2 = theta.clone().requires_grad_(True)
        n = torch.tensor(float(len(data["y"])))
        fast = client_loss(
            net, t2, data["x"], data["y"], torch.ones(len(data["y"])), n, penalty, normalise=False
        )
        (grad_fast,) = torch.autograd.grad(fast, t2)
        value, direct, fast = value.item(), direct.item(), fast.item()
        assert math.isclose(value, direct, rel_tol=1e-12)
        assert math.isclose(value, fast, rel_tol=1e-12)
        assert torch.allclose(grad_pyro.reshape(-1), grad_direct, rtol=1e-10, atol=1e-12)
        assert torch.allclose(grad_pyro.reshape(-1), grad_fast, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
def test_one_round_equals_federated_svi(engine):
    """A whole round: FederatedSVI (AutoDelta, closed-form server) == FedHB (Adam, full batch,
    summed objective), both starting at m0. Only round 1 compares: FederatedSVI's clients
    keep their own q_i between rounds, FedHB's warm start at m0 every round."""
    net = FlatNet(tiny_net(sizes=(3, 4, 3)))
    init = net.vector()
    fam = diag_prior(init, prox_weight=2.0, pseudo_clients=4.0)
    clients = _pyro_clients(seed=3)
    steps, lr = 6, 0.02
    fit = FederatedSVI(
        network_model(net, fam),
        clients,
        server=fam,
        local_guide=AutoDelta,
        local_steps=steps,
        local_lr=lr,
    )
    for client in fit.clients.values():
        _set_delta(client, init)
    record = fit.step()
    assert record["clients"] == sorted(clients) and record["failed"] == []
    fedhb = FedHB(
        net.net,
        [(c["x"], c["y"]) for c in clients.values()],
        fam,
        engine=engine,
        local=LocalSpec(epochs=steps, batch_size=64, lr=lr, optimizer="adam", normalise=False),
    )
    fedhb.step()
    moved = float((fedhb.params["m0"] - init).abs().max())
    assert moved > 1e-3
    for key, value in fit.server.family_params.items():
        assert torch.allclose(value, fedhb.params[key], rtol=1e-10, atol=TOL), key


# --------------------------------------------------------------------------------------
# Server: participation and weighting
# --------------------------------------------------------------------------------------


def test_participation_and_weighting_sums():
    torch.manual_seed(0)
    d, sizes = 4, [10, 30, 60]
    clients = [(torch.randn(n, 2), torch.zeros(n, dtype=torch.long)) for n in sizes]
    net = mlp((2, 2))  # d = 6
    init = FlatNet(net.double()).vector()
    d = init.shape[0]
    fam = NIWIso(d, mu0=init, lambda0=1e-300, a0=2.0, b0=3.0)
    thetas = torch.randn(3, d)
    eps = 0.1

    def fresh(**kw):
        return FedHB(net, clients, fam, eps=eps, **kw)

    def by_hand(pool, w):
        parts = [fam.client_summary(thetas[i], torch.full((d,), eps**2)) for i in pool]
        sums = {k: sum(wi * p[k] for wi, p in zip(w, parts)) for k in parts[0]}
        return fam.server_update(sums, 3)

    # scaled + equal: N / |S| each; m0 the plain mean of the round's clients.
    fit = fresh(participation="scaled", weighting="equal")
    fit.aggregate([0, 2], thetas[[0, 2]])
    assert torch.allclose(fit.params["m0"], thetas[[0, 2]].mean(0))
    assert torch.allclose(fit.params["b"], by_hand([0, 2], [1.5, 1.5])["b"])
    # scaled + size: N n_i / sum n_j; m0 FedAvg's weighted mean.
    fit = fresh(participation="scaled", weighting="size")
    fit.aggregate([0, 2], thetas[[0, 2]])
    assert torch.allclose(fit.params["m0"], (10 * thetas[0] + 60 * thetas[2]) / 70)
    assert torch.allclose(fit.params["b"], by_hand([0, 2], [30 / 70, 180 / 70])["b"])
    # stale: absent clients keep their last summary.
    fit = fresh(participation="stale", weighting="equal")
    fit.aggregate([0, 2], thetas[[0, 2]])
    fit.aggregate([1], thetas[[1]])
    assert torch.allclose(fit.params["m0"], thetas.mean(0))
    fit.aggregate([0], thetas[[1]])  # client 0's summary is replaced, not added
    assert torch.allclose(fit.params["m0"], (2 * thetas[1] + thetas[2]) / 3)


# --------------------------------------------------------------------------------------
# The high-dimension trap (method.md §4)
# --------------------------------------------------------------------------------------


def test_prox_weight_does_not_grow_with_dimension(report):
    """Hyper-priors stated per parameter: the prox weight at the prior is the stated one for
    any d, and after a server update it is ~ 1 / (per-coordinate client spread + eps^2)
    for any d. The habit it avoids: a full NIW with nu0 = d + 2 and prior mean of Sigma
    equal to s I has prior prox weight (d + 2) / s, growing with d."""
    N, spread, eps, prox0, k = 20, 0.01, 0.05, 2.0, 1.0
    seen = {}
    for d in (10, 1_000, 100_000):
        g = torch.Generator().manual_seed(d)
        m = math.sqrt(spread) * torch.randn(N, d, generator=g)
        for kind, make in (("iso", iso_prior), ("diag", diag_prior)):
            fam = make(torch.zeros(d), prox_weight=prox0, pseudo_clients=k)
            assert torch.allclose(prox_weight(fam, fam.init_params()), torch.tensor(prox0))
            parts = fam.client_summary(m, torch.full_like(m, eps**2))
            params = fam.server_update({key: v.sum(0) for key, v in parts.items()}, N)
            seen[kind, d] = float(prox_weight(fam, params).mean())
    # Expected: (k + N) / (k / prox0 + N (spread + eps^2)) up to the sample spread.
    expect = (k + N) / (k / prox0 + N * (spread + eps**2))
    for (kind, d), value in seen.items():
        tol = 0.5 if (kind, d) == ("iso", 10) or kind == "diag" else 0.05
        assert abs(value / expect - 1) < tol, (kind, d, value, expect)
    iso = [seen["iso", d] for d in (1_000, 100_000)]
    assert abs(iso[1] / iso[0] - 1) < 0.02
    # The trap: mean of Sigma fixed at s I with the smallest nu0 makes the prox weight
    # nu0 / s per coordinate at the prior, i.e. linear in d.
    s = 0.5
    trap = []
    for d in (2, 8, 32):
        fam = NIWFull(d, lambda0=1.0, nu0=d + 2, Sigma0=(d + 2 - d - 1) * s * torch.eye(d))
        trap.append(float(prox_weight(fam, fam.init_params()).mean()))
    assert trap == pytest.approx([(d + 2) / s for d in (2, 8, 32)])
    report(
        f"deep prox weight after one update, iso d=1e3/1e5: {iso[0]:.2f}/{iso[1]:.2f} "
        f"(expected {expect:.2f}); full NIW nu0=d+2 at d=2/8/32: {trap}"
    )


def test_start_own_resumes_each_clients_weights(small_mnist):
    """``start="own"``: a client's local training resumes from its own last ``m_i``
    (checked against the loop engine started there by hand), ``m0`` before its first
    round; ``start`` is validated."""
    from hbfl_pyro.deep.local import schedules_for

    x, y = small_mnist
    clients = [(x[i * 40 : (i + 1) * 40], y[i * 40 : (i + 1) * 40]) for i in range(4)]
    net = tiny_net()
    spec = LocalSpec(epochs=1, batch_size=16, lr=0.1)
    family = iso_prior(FlatNet(net).vector())
    fit = FedHB(net, clients, family, eps=0.1, start="own", fraction=0.5, local=spec, seed=3)
    first = fit.step()["clients"]
    starts = fit.starts(range(4))
    for i in range(4):
        expected = fit._own[i] if i in first else fit.global_weights()
        assert torch.equal(starts[i], expected)
    penalty = fit.penalty()  # q(phi) after round 1: what round 2's clients use
    second = fit.step()["clients"]
    assert set(first) & set(second), "seed 3 should bring a client back in round 2"
    sched = schedules_for(fit.sizes, spec, 3, 2, second)
    by_hand = train_loop(
        fit.net, starts[second], [fit.data[i] for i in second], sched, spec, penalty
    )
    for j, i in enumerate(second):
        assert torch.allclose(fit._own[i], by_hand[j], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="start must be"):
        FedHB(net, clients, family, start="mine")
