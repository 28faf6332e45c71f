"""FedAvg and FedProx are special cases of the hierarchy (method.md §5), demonstrated.

The hierarchy (:class:`hbfl_pyro.deep.FedHB`, the NIW-isotropic family in a limit) and an
independent plain implementation (:func:`hbfl_pyro.deep.baselines.reference_fedavg`:
module copies, ``torch.optim.SGD``, mean minibatch loss, state-dict averaging) run with
the same seeds, the same clients each round and the same minibatches, and end with the
same weights after several rounds.

Client weighting: FedAvg weights clients by data size; the hierarchy counts every client
once unless ``weighting="size"`` (each summary counted ``N n_i / sum n_j`` times). Both
are tested: size-weighted hierarchy == FedAvg, equal-weighted hierarchy == the
equal-weighted reference, and the two weightings differ (so the tests are not vacuous).

Tolerance (float64): the two implementations compute the same updates in a different
order of floating-point operations (a flat vector vs per-layer tensors, ``mean`` vs
``(n / B) sum / n``, a prox weight ``a / b`` equal to ``mu n`` to one ulp, a weighted sum
of summaries divided by ``N`` vs a weighted average). Each step adds differences of a few
ulps (~1e-16 relative) that the later steps carry along; after 4 rounds of 2 local epochs
(about 80 sequential SGD steps per client) the observed maximum difference is ~2e-16, and
1e-10 leaves a wide margin while being ~9 orders of magnitude below the changes the
methods make to the weights (> 0.1).
"""

import pytest
import torch
import torch.nn.functional as F

from hbfl_pyro.deep import FedHB, FlatNet, LocalSpec, fedavg_family, fedprox_family, mlp, partition
from hbfl_pyro.deep.baselines import FedProx, reference_fedavg
from hbfl_pyro.deep.data import load_mnist

# Every test here trains for several rounds against a reference: slow tier.
pytestmark = pytest.mark.slow

TOL = 1e-10
ROUNDS, FRACTION, EPOCHS, BATCH, LR, SEED = 4, 0.5, 2, 16, 0.1, 7


@pytest.fixture(scope="module")
def mnist_small():
    from conftest import SHARED_DATA

    x, y = load_mnist(SHARED_DATA / "mnist_t10k")
    return F.avg_pool2d(x[:1300], 4).to(torch.float64), y[:1300]


def net0():
    torch.manual_seed(0)
    return mlp((49, 16, 10)).to(torch.float64)


def reference(clients, **kw):
    data = [(c.x_train, c.y_train) for c in clients]
    out = reference_fedavg(
        net0(),
        data,
        ROUNDS,
        fraction=FRACTION,
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        seed=SEED,
        **kw,
    )
    return FlatNet(out).vector()


def hierarchy(clients, family, engine="inprocess", weighting="size"):
    net = net0()
    fit = FedHB(
        net,
        clients,
        family(FlatNet(net).vector()),
        eps=0.0,
        fraction=FRACTION,
        participation="scaled",
        weighting=weighting,
        engine=engine,
        seed=SEED,
        local=LocalSpec(epochs=EPOCHS, batch_size=BATCH, lr=LR),
    )
    fit.run(ROUNDS)
    return fit


@pytest.fixture(scope="module")
def unequal(mnist_small):
    x, y = mnist_small
    split = partition(
        x,
        y,
        dirichlet="class",
        alpha=0.5,
        num_clients=6,
        num_new_clients=0,
        global_test=100,
        seed=0,
    )
    sizes = [c.num_train for c in split.clients]
    assert max(sizes) > 1.5 * min(sizes)
    return split.clients


@pytest.fixture(scope="module")
def equal(mnist_small):
    x, y = mnist_small
    split = partition(x, y, scheme="iid", num_clients=6, num_new_clients=0, global_test=100, seed=0)
    assert len({c.num_train for c in split.clients}) == 1
    return split.clients


@pytest.mark.parametrize("engine", ["inprocess", "vectorised"])
def test_fedavg_is_the_vague_limit(unequal, engine, report):
    ref = reference(unequal, weighting="size")
    fit = hierarchy(unequal, fedavg_family, engine)
    init = FlatNet(net0()).vector()
    diff = float((fit.global_weights() - ref).abs().max())
    report(f"deep FedAvg == hierarchy limit ({engine}, weighted by size): max |diff| {diff:.1e}")
    assert float((ref - init).abs().max()) > 0.1
    assert fit.prox_weight() < 1e-290  # the limit: no pull at float64 resolution
    assert diff < TOL
    # Weighting matters: the equal-weighted hierarchy is the equal-weighted reference,
    # not FedAvg.
    equal_fit = hierarchy(unequal, fedavg_family, engine, weighting="equal")
    assert float((equal_fit.global_weights() - ref).abs().max()) > 1e-3
    ref_equal = reference(unequal, weighting="equal")
    assert float((equal_fit.global_weights() - ref_equal).abs().max()) < TOL


def test_fedprox_is_the_fixed_covariance_limit(equal, unequal, report):
    mu = 0.5
    n = equal[0].num_train
    ref = reference(equal, mu=mu)
    fit = hierarchy(equal, lambda init: fedprox_family(init, prox_weight=mu * n))
    diff = float((fit.global_weights() - ref).abs().max())
    report(f"deep FedProx(mu={mu}) == hierarchy with q(sigma2) at 1/(mu n): max |diff| {diff:.1e}")
    assert fit.prox_weight() == pytest.approx(mu * n, rel=1e-15)
    assert diff < TOL
    assert float((ref - reference(equal)).abs().max()) > 1e-3  # FedProx is not FedAvg here
    # Unequal sizes: a fixed Sigma = I / P is FedProx with mu_i = P / n_i per client.
    P = 40.0
    ref_unequal = reference(unequal, mu=[P / c.num_train for c in unequal])
    fit = hierarchy(unequal, lambda init: fedprox_family(init, prox_weight=P))
    assert float((fit.global_weights() - ref_unequal).abs().max()) < TOL


def test_engine_fedprox_equals_reference(unequal):
    """The benchmark's FedAvg / FedProx (shared local engine) are the reference too."""
    for mu in (0.0, 0.3):
        ref = reference(unequal, mu=mu)
        fit = FedProx(
            net0(),
            unequal,
            mu=mu,
            fraction=FRACTION,
            engine="vectorised",
            seed=SEED,
            local=LocalSpec(epochs=EPOCHS, batch_size=BATCH, lr=LR),
        )
        fit.run(ROUNDS)
        assert float((fit.global_weights() - ref).abs().max()) < TOL
