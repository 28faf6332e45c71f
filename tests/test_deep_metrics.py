"""Metrics of ``hbfl_pyro.deep.metrics``: ECE and NLL against direct computations, and the
global / personalised / new-client evaluation of trained methods."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hbfl_pyro.deep import FedHB, FlatNet, LocalSpec, iso_prior, mlp, partition
from hbfl_pyro.deep.baselines import FedProx, local_only
from hbfl_pyro.deep.data import load_mnist
from hbfl_pyro.deep.metrics import ece, evaluate, scores


def ece_by_hand(probs, y, bins=15):
    probs, y = np.asarray(probs), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = (conf > lo) & (conf <= hi)
        if rows.any():
            total += rows.sum() * abs((pred[rows] == y[rows]).mean() - conf[rows].mean())
    return total / len(y)


def test_ece_and_nll_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 10, generator=g)
    y = torch.randint(0, 10, (500,), generator=g)
    probs = logits.softmax(-1)
    assert ece(probs, y) == pytest.approx(ece_by_hand(probs, y), abs=1e-12)
    s = scores(logits, y)
    assert s["nll"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
    assert s["acc"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    # Calibrated by construction: confidence 0.75, correct 3 times in 4 -> ECE 0.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-15)
    assert ece(probs, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)


@pytest.mark.slow
def test_evaluate_reports_every_metric_and_the_prox_holds_personal_models_near_m0():
    from conftest import SHARED_DATA

    x, y = load_mnist(SHARED_DATA / "mnist_t10k")
    x, y = F.avg_pool2d(x[:1500], 4).double(), y[:1500]
    split = partition(x, y, alpha=0.3, num_clients=8, num_new_clients=2, global_test=200, seed=0)
    torch.manual_seed(0)
    net = mlp((49, 16, 10)).double()
    spec = LocalSpec(epochs=1, batch_size=16, lr=0.2)
    init = FlatNet(net).vector()
    hb = FedHB(
        net,
        split.clients,
        iso_prior(init, prox_weight=500.0, pseudo_clients=50.0),
        eps=0.05,
        local=spec,
    )
    avg = FedProx(net, split.clients, local=spec)
    for fit in (hb, avg):
        fit.run(3)
    keys = {f"{a}_{b}" for a in ("global", "personal", "new") for b in ("acc", "nll", "ece")}
    for fit in (hb, avg):
        out = evaluate(fit, split, finetune_epochs=2)
        assert keys | {"new_global_acc"} == set(out)
        assert all(0.0 <= out[k] <= 1.0 for k in out if not k.endswith("nll"))
        assert out["personal_acc"] > 0.3  # far above chance (0.1) after fine-tuning
    # The learned prox (strong hyper-prior here) keeps fine-tuned models near m0.
    data = [(c.x_train, c.y_train) for c in split.clients]
    near = (hb.finetune(data, 3) - hb.global_weights()).norm(dim=1)
    far = (avg.finetune(data, 3) - avg.global_weights()).norm(dim=1)
    assert bool((near < far).all())
    # Scoring given personal weights (the local-only baseline).
    local = local_only(avg, split.clients, epochs=2)
    new = local_only(avg, split.new_clients, epochs=2)
    out = evaluate(avg, split, personal=local, new_personal=new)
    assert out["personal_acc"] > 0.3
