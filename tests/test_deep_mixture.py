"""The mixture hierarchy for networks (method.md §6): K = 1 is FedHB, the soft-min prox and
its responsibilities, the per-component closed-form server update, specialisation on
rotated clusters, and the gate's uniform fallback.

All in float64 (conftest).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from hbfl_pyro.deep import FedHB, FlatNet, LocalSpec, diag_prior, iso_prior, mlp, partition
from hbfl_pyro.deep.data import load_mnist
from hbfl_pyro.deep.local import batch_schedule, train_loop, train_vmap
from hbfl_pyro.deep.mixture import (
    FedHBMixture,
    MixturePenalty,
    cluster_directions,
    component_inits,
    mixture_priors,
)


@pytest.fixture(scope="module")
def small_mnist():
    """MNIST test images average-pooled to 7x7 (49 features), first 2,400 images."""
    from conftest import SHARED_DATA

    x, y = load_mnist(SHARED_DATA / "mnist_t10k")
    return F.avg_pool2d(x[:2400], 4).to(torch.float64), y[:2400]


def tiny_net(seed=0, sizes=(49, 12, 10)):
    torch.manual_seed(seed)
    return mlp(sizes).to(torch.float64)


# --------------------------------------------------------------------------------------
# K = 1 is FedHB
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "prior,participation,engine",
    [
        (iso_prior, "scaled", "vectorised"),
        (diag_prior, "stale", "inprocess"),
        (iso_prior, "stale", "vectorised"),
    ],
    ids=["iso-scaled-vectorised", "diag-stale-inprocess", "iso-stale-vectorised"],
)
def test_one_component_is_fedhb_exactly(small_mnist, prior, participation, engine):
    """Same family, clients, schedule: with K = 1 every responsibility is exactly 1, the
    prox gradient and the server's sums are computed in the same order, so the whole run is
    bit for bit FedHB's (torch.equal, no tolerance)."""
    x, y = small_mnist
    split = partition(x, y, scheme="iid", num_clients=6, num_new_clients=0, global_test=100)
    common = dict(
        eps=0.05,
        fraction=0.5,
        local=LocalSpec(epochs=2, batch_size=16, lr=0.1),
        participation=participation,
        weighting="size",
        engine=engine,
        seed=3,
    )
    net = tiny_net()
    family = prior(FlatNet(net).vector(), prox_weight=5.0)
    ref = FedHB(net, split.clients, family, **common)
    mix = FedHBMixture(net, split.clients, [family], **common)
    ref.run(4)
    mix.run(4)
    for key, value in ref.params.items():
        assert torch.equal(mix.params[0][key], value), key
    assert all(bool((r["responsibilities"] == 1).all()) for r in mix.history)
    tuned_ref = ref.finetune([(c.x_train, c.y_train) for c in split.clients[:2]], 2)
    tuned_mix = mix.finetune([(c.x_train, c.y_train) for c in split.clients[:2]], 2)
    assert torch.equal(tuned_ref, tuned_mix)


# --------------------------------------------------------------------------------------
# The soft-min prox
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_softmin_prox_and_responsibilities(small_mnist):
    """K = 3: responsibilities sum to one; the in-place gradient the engines use equals
    autograd of -logsumexp (both engines, to round-off); the value is -logsumexp of the
    components' expected log densities (method.md §6)."""
    x, y = small_mnist
    split = partition(x, y, scheme="iid", num_clients=4, num_new_clients=0, global_test=100)
    data = [(c.x_train, c.y_train) for c in split.clients]
    net = tiny_net()
    fams = mixture_priors(net, 3, prior=diag_prior, seed=1, prox_weight=20.0)
    mix = FedHBMixture(net, data, fams, eps=0.05, mixing="learned")
    g = torch.Generator().manual_seed(0)
    mix.alpha = torch.tensor([1.0, 3.0, 2.0])  # unequal mixing weights
    for p in mix.params:
        p["b"] = p["b"] * (0.5 + torch.rand(p["b"].shape, generator=g))  # varied a / b
    pen = mix.penalty()
    assert isinstance(pen, MixturePenalty)
    centers = mix.centers()
    # Points between the centres, so that no responsibility is 0 or 1 to round-off.
    mixw = torch.softmax(torch.randn(5, 3, generator=g), -1)
    theta = mixw @ centers + 0.01 * torch.randn(5, mix.net.d, generator=g)
    theta[0] = centers[1] + 0.001 * torch.randn(mix.net.d, generator=g)  # one near centre 1
    resp = mix.responsibilities(theta)
    assert torch.allclose(resp.sum(-1), torch.ones(5), atol=1e-12, rtol=0)
    assert int(resp[0].argmax()) == 1
    # The value: -logsumexp_k(E log pi_k + E_q log N(theta; k) - eps^2/2 tr E[P_k]) up to
    # one constant shared by all theta (the engines only need differences).
    log_w = torch.digamma(mix.alpha) - torch.digamma(mix.alpha.sum())
    direct = torch.stack(
        [
            log_w[k] + f.expected_log_prior(theta, p) - 0.5 * 0.05**2 * (p["a"] / p["b"]).sum()
            for k, (f, p) in enumerate(zip(fams, mix.params))
        ],
        -1,
    )
    value = pen(theta, 1.0)
    shift = value + torch.logsumexp(direct, -1)
    assert float(shift.max() - shift.min()) < 1e-6  # values of order 1e3-1e4, float64
    assert torch.allclose(torch.softmax(direct, -1), resp, atol=1e-10)
    # In-place gradient vs autograd of __call__, through both engines.
    spec = LocalSpec(epochs=1, batch_size=16, lr=0.05)
    sched = [batch_schedule(len(d[1]), 16, 1, seed=i) for i, d in enumerate(data)]
    starts = theta[:4]

    def autograd_penalty(t, n):
        return pen(t, n)

    fast = train_vmap(mix.net, starts, data, sched, spec, pen)
    slow = train_loop(mix.net, starts, data, sched, spec, autograd_penalty)
    assert float((fast - starts).abs().max()) > 1e-3  # it moved
    assert float((fast - slow).abs().max()) < 1e-10  # same maths, different op order


# --------------------------------------------------------------------------------------
# The server update
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["iso", "diag"])
def test_server_update_is_the_per_component_closed_form(kind):
    """Hand-made client vectors and responsibilities: each component's q is the NIW closed
    form of method.md §4 with the clients' m_i weighted by r_ik (N_k = sum_i r_ik), and
    q(pi) = Dirichlet(alpha0 + N_k). Written out here from the formulas, not through the
    family's server_update."""
    eps, lam0 = 0.1, 0.5
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Linear(1, 2)).to(torch.float64)
    d = FlatNet(net).d
    g = torch.Generator().manual_seed(5)
    inits = torch.randn(2, d, generator=g)
    if kind == "iso":
        fams = [iso_prior(row, prox_weight=3.0, pseudo_clients=2.0, lambda0=lam0) for row in inits]
    else:
        fams = [diag_prior(row, prox_weight=3.0, pseudo_clients=4.0, lambda0=lam0) for row in inits]
    clients = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    mix = FedHBMixture(net, clients, fams, eps=eps, alpha0=0.7, weighting="equal")
    thetas = torch.randn(5, d, generator=g)
    resp = torch.softmax(torch.randn(5, 2, generator=g), -1)
    record = mix.aggregate(list(range(5)), thetas, resp=resp)
    for k, fam in enumerate(fams):
        r = resp[:, k]
        n_k = r.sum()
        l0 = lam0 + n_k
        m0 = (lam0 * fam.mu0 + (r[:, None] * thetas).sum(0)) / l0
        a0, b0 = fam.a0, fam.b0
        if kind == "iso":
            scatter = (r * (thetas.pow(2).sum(-1) + d * eps**2)).sum()
            scatter = scatter + lam0 * fam.mu0.pow(2).sum() - l0 * m0.pow(2).sum()
            a, b = a0 + n_k * d / 2, b0 + 0.5 * scatter
        else:
            scatter = (r[:, None] * (thetas.pow(2) + eps**2)).sum(0)
            scatter = scatter + lam0 * fam.mu0.pow(2) - l0 * m0.pow(2)
            a, b = a0 + n_k / 2, b0 + 0.5 * scatter
        got = mix.params[k]
        assert torch.allclose(got["l0"], l0.expand_as(got["l0"]), rtol=1e-12)
        assert torch.allclose(got["m0"], m0, rtol=1e-12, atol=1e-12)
        assert torch.allclose(got["a"], a.expand_as(got["a"]), rtol=1e-12)
        assert torch.allclose(got["b"], b.expand_as(got["b"]), rtol=1e-12)
        assert torch.allclose(record["counts"][k], n_k, rtol=1e-12)
    assert torch.allclose(mix.alpha, 0.7 + resp.sum(0), rtol=1e-12)
    assert torch.allclose(mix.mixing_weights().sum(), torch.tensor(1.0))


# --------------------------------------------------------------------------------------
# Specialisation on rotated clusters, and the gate
# --------------------------------------------------------------------------------------


def two_rotation_mixture(small_mnist, global_test=100, **start):
    """12 clients in two rotation groups (0 and 90 degrees) of 7x7 MNIST and a K = 2
    mixture of linear softmax models (one linear model cannot fit both rotations well),
    its components started as ``start`` says (``warmup_rounds`` or ``cluster_rounds``)."""
    x, y = small_mnist
    split = partition(
        x, y, scheme="iid", num_clients=12, num_new_clients=0, rotations=2, global_test=global_test
    )
    net = tiny_net(sizes=(49, 10))
    fams = mixture_priors(net, 2, seed=0, prox_weight=100.0, pseudo_clients=0.01)
    fit = FedHBMixture(
        net,
        split.clients,
        fams,
        eps=0.1,
        fraction=0.5,
        local=LocalSpec(epochs=2, batch_size=16, lr=0.1),
        participation="stale",
        mixing="uniform",
        seed=0,
        **start,
    )
    return split, fit


@pytest.mark.slow
def test_components_specialise_on_rotated_clusters(small_mnist, report):
    """Two rotation groups (0 and 90 degrees) of 7x7 MNIST, 12 clients, K = 2, a linear
    softmax model (one linear model cannot fit both rotations well, so the clusters matter).

    Threshold: a client's responsibility counts for its group's majority component; we ask
    that >= 90% of each group's responsibility mass sits on one component and that the two
    groups pick different components. A collapse (one component for everyone) fails the
    second condition, a random assignment gives about 50% (on 6 clients per group, 90%
    means at most half a client's mass elsewhere), so the test can fail both ways.
    Then the gate: trained by FedAvg on the clients' responsibilities, its argmax must route
    >= 80% of the global test images (400, binomial sd <= 2.5%) to their rotation's
    component, against 50% for a gate that has learnt nothing; ``gate=False`` must give
    the uniform ensemble.
    """
    split, fit = two_rotation_mixture(small_mnist, global_test=400, warmup_rounds=2)
    fit.run(12)
    groups = torch.tensor([c.group for c in split.clients])
    resp = torch.stack([fit.client_resp[i] for i in range(len(split.clients))])
    shares, picks = [], []
    for grp in (0, 1):
        mass = resp[groups == grp].sum(0)
        shares.append(float(mass.max() / mass.sum()))
        picks.append(int(mass.argmax()))
    report(f"deep mixture specialisation (2 rotations): group shares {shares}, picks {picks}")
    assert min(shares) >= 0.9
    assert picks[0] != picks[1]

    fit.train_gate(
        tiny_net(1, sizes=(49, 16, 2)), rounds=20, local=LocalSpec(epochs=5, batch_size=16, lr=0.1)
    )
    gate = fit.gate_probs(split.x_test)
    own = torch.tensor(picks)[split.test_groups]
    routed = float((gate.argmax(-1) == own).double().mean())
    report(f"deep mixture gate: test images routed to their rotation's component {routed:.3f}")
    assert routed >= 0.8
    # The fallback: gate=False is the uniform ensemble of the components' predictions.
    uniform = fit.predict_proba(split.x_test, gate=False)
    by_hand = torch.stack([torch.softmax(fit.net(c, split.x_test), -1) for c in fit.centers()])
    assert torch.allclose(uniform, by_hand.mean(0), atol=1e-12)
    gated = fit.predict_proba(split.x_test)
    assert torch.allclose(gated, (gate.T[:, :, None] * by_hand).sum(0), atol=1e-12)


def test_cluster_directions_groups_by_direction_not_size():
    """Three hidden directions in 200 dimensions, 7 updates each, scaled by sizes from 0.1
    to 10 and perturbed by noise of 0.2 per unit: k-means on the unit sphere must recover
    the three groups exactly (a partition, labels up to permutation), and the same seed
    must give the same labels. Euclidean k-means on the raw rows would group by size."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 200, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    truth = torch.arange(21) % 3
    sizes = torch.logspace(-1, 1, 21, dtype=torch.float64)
    noise = 0.2 * torch.randn(21, 200, generator=gen, dtype=torch.float64) / 200**0.5
    rows = sizes[:, None] * (directions[truth] + noise)
    labels = cluster_directions(rows, 3, seed=4)
    pairs = {(int(t), int(k)) for t, k in zip(truth, labels)}
    assert len(pairs) == 3 and len({k for _, k in pairs}) == 3
    assert torch.equal(labels, cluster_directions(rows, 3, seed=4))
    with pytest.raises(ValueError, match="cannot make 4 clusters of 3"):
        cluster_directions(rows[:3], 4)


@pytest.mark.slow
def test_cluster_rounds_start_the_components_from_the_clients_groups(small_mnist):
    """Two rotation groups (0 and 90 degrees), 12 clients, K = 2, linear softmax model:
    after ``cluster_rounds`` shared rounds the server's groups are the rotation groups
    (every client heard from, both ways round), each component is the closed-form update
    of its own group's latest replies (checked against component 0 refitted with the
    group's one-hot responsibilities), and with ``hold_rounds`` both components keep
    their groups. Before the clustering only component 0 is fitted."""
    split, fit = two_rotation_mixture(small_mnist, cluster_rounds=3, hold_rounds=4)
    net, fams = fit.net.net, fit.families
    fit.run(2)
    assert all(float(r["counts"][1]) == 0.0 for r in fit.history)
    clusters = fit.step()["clusters"]
    groups = {i: c.group for i, c in enumerate(split.clients)}
    assert len(clusters) >= 10  # heard from after 3 rounds of 6 clients
    by_group = {g: {k for i, k in clusters.items() if groups[i] == g} for g in (0, 1)}
    assert all(len(v) == 1 for v in by_group.values()) and by_group[0] != by_group[1]
    # Component k is the family's closed form of its group's stale replies alone.
    for k in (0, 1):
        members = sorted(i for i, c in clusters.items() if c == k)
        # weighting="equal": every reply in the pool counts N / (pool size) clients.
        w = torch.full((len(members),), fit.num_clients / len(clusters), dtype=torch.float64)
        rows = [
            fams[k].client_summary(fit.server.stale[i][0], torch.full((fit.net.d,), 0.1**2))
            for i in members
        ]
        sums = {key: sum(wj * row[key] for wj, row in zip(w, rows)) for key in rows[0]}
        expected = fams[k].server_update(sums, w.sum())
        for key, value in expected.items():
            assert torch.allclose(fit.params[k][key], value, rtol=1e-10, atol=1e-12), (k, key)
    fit.run(4)  # held: every client reports its group's component
    for i, r in fit.client_resp.items():
        assert int(r.argmax()) == fit.labels[i]
        if i in clusters:
            assert fit.labels[i] == clusters[i]
    with pytest.raises(ValueError, match="give one of them"):
        FedHBMixture(net, split.clients, fams, warmup_rounds=2, cluster_rounds=2)
    with pytest.raises(ValueError, match='participation="stale"'):
        FedHBMixture(net, split.clients, fams, cluster_rounds=2, participation="scaled")


def test_no_gate_falls_back_to_uniform_and_input_errors():
    net = tiny_net(sizes=(4, 3))
    clients = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    fit = FedHBMixture(net, clients, mixture_priors(net, 2, seed=0))
    xs = torch.randn(6, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = fit.predict_proba(xs)
    assert any("uniform" in str(w.message) for w in caught)
    assert torch.equal(probs, fit.predict_proba(xs, gate=False))
    assert torch.equal(fit.gate_probs(xs), torch.full((6, 2), 0.5))
    with pytest.raises(ValueError, match="NIWIso or every one an NIWDiag"):
        FedHBMixture(
            net, clients, [iso_prior(FlatNet(net).vector()), diag_prior(FlatNet(net).vector())]
        )
    with pytest.raises(ValueError, match="mixing"):
        FedHBMixture(net, clients, mixture_priors(net, 2), mixing="dirichlet")
    with pytest.raises(ValueError, match="component 1's family has d"):
        FedHBMixture(net, clients, [iso_prior(FlatNet(net).vector()), iso_prior(torch.zeros(3))])
    inits = component_inits(net, 3, seed=4)
    assert torch.equal(inits, component_inits(net, 3, seed=4))  # seeded
    assert torch.equal(inits[0], FlatNet(net).vector())
    assert not torch.equal(inits[1], component_inits(net, 3, seed=5)[1])
