"""Evaluation of federated networks (evaluation.md §B): accuracy, NLL and calibration of the
global model, of personalised models and of held-out ("new") clients.

- **global**: the global weights (FedHB: ``m0``, method.md §7) on the balanced global test;
- **personalised**: every training client fine-tunes on its own train split from where the
  method's ``finetune`` starts it (the global weights; FedHB ``start="own"``: its own
  ``m_i``; the mixture: its best centre), with the method's own personal objective (FedHB:
  the learned prox under the final ``q(phi)``; Ditto: its lambda prox; Per-FedAvg: plain
  SGD at its step alpha; pFedBayes: its ELBO), and is scored on its own test split; scores
  pool all clients' test images;
- **new clients**: the same for clients never seen in training;
- NLL is the mean negative log-likelihood; ECE uses 15 equal-width confidence bins.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .data import ClientSplit, FederatedSplit
from .nets import WeightFunction

__all__ = ["ece", "evaluate", "predict", "scores"]


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: ``sum_b |B_b| / n |acc(B_b) - conf(B_b)|`` over
    ``bins`` equal-width bins of the top-class confidence.

    Example::

        >>> import torch
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> round(ece(probs, torch.tensor([0, 1, 1])), 4)  # bins 0.9, 0.6, 0.7
        0.3333
    """
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    # Bin b holds confidences in ((b - 1) / bins, b / bins]; confidences are > 0.
    which = (conf * bins).ceil().long().clamp(1, bins) - 1
    total = probs.new_zeros(())
    for b in range(bins):
        rows = which == b
        if rows.any():
            total = total + rows.sum() * (correct[rows].mean() - conf[rows].mean()).abs()
    return float(total / max(len(y), 1))


def scores(logits: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """``{"acc", "nll", "ece"}`` of logits ``(n, classes)`` against labels ``(n,)``."""
    logp = torch.log_softmax(logits.double(), -1)
    return {
        "acc": float((logp.argmax(-1) == y).double().mean()),
        "nll": float(-logp.gather(-1, y[:, None]).mean()),
        "ece": ece(logp.exp(), y),
    }


@torch.no_grad()
def predict(
    net: WeightFunction, theta: torch.Tensor, x: torch.Tensor, batch: int = 4096
) -> torch.Tensor:
    """Logits (on the CPU) of the network with weights ``theta`` on ``x``, in chunks."""
    x = x.to(dtype=theta.dtype, device=theta.device)
    return torch.cat([net(theta, x[i : i + batch]).cpu() for i in range(0, len(x), batch)])


def _pooled(
    net: WeightFunction, thetas: torch.Tensor, tests: Sequence[Tuple[torch.Tensor, torch.Tensor]]
) -> Dict[str, float]:
    logits = torch.cat([predict(net, t, x) for t, (x, _) in zip(thetas, tests)])
    return scores(logits, torch.cat([y for _, y in tests]))


def evaluate(
    trainer,
    split: FederatedSplit,
    finetune_epochs: int = 5,
    personal: Optional[torch.Tensor] = None,
    new_personal: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """All metrics of a trained federated method.

    :param trainer: a :class:`~hbfl_pyro.deep.fedhb.FederatedTrainer` (FedHB, FedProx).
    :param split: the federation it was trained on.
    :param finetune_epochs: local epochs of personalisation.
    :param personal: personalised weights of the training clients ``(N, d)`` to score
        instead of fine-tuning (e.g. a local-only baseline); ``new_personal`` likewise for
        the new clients.
    :returns: ``global_{acc,nll,ece}``, ``personal_{acc,nll,ece}``, ``new_{acc,nll,ece}``
        and ``new_global_acc`` (the global weights on the new clients' test images).
    """
    net = trainer.net

    def pairs(clients: Sequence[ClientSplit], train: bool):
        return [((c.x_train, c.y_train) if train else (c.x_test, c.y_test)) for c in clients]

    out: Dict[str, float] = {}
    weights = trainer.global_weights()
    for key, value in scores(predict(net, weights, split.x_test), split.y_test).items():
        out[f"global_{key}"] = value
    if personal is None:
        personal = trainer.finetune(
            pairs(split.clients, True), finetune_epochs, clients=range(len(split.clients))
        )
    for key, value in _pooled(net, personal, pairs(split.clients, False)).items():
        out[f"personal_{key}"] = value
    if split.new_clients:
        if new_personal is None:
            new_personal = trainer.finetune(
                pairs(split.new_clients, True), finetune_epochs, tag="finetune-new"
            )
        for key, value in _pooled(net, new_personal, pairs(split.new_clients, False)).items():
            out[f"new_{key}"] = value
        tests = pairs(split.new_clients, False)
        out["new_global_acc"] = _pooled(net, weights.expand(len(tests), -1), tests)["acc"]
    return out
