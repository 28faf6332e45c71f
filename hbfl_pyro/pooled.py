"""The centralised reference: the same model and guide family fitted on pooled data.

This is what federated results are compared with (tests, reports). It uses plain Pyro:
``SVI`` with ``Trace_ELBO`` on the collated data of every client.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import ClippedAdam

from .data import FederatedData
from .guides import build_local_guide, private_params
from .seeding import seeded


def fit_pooled_svi(
    model: Callable,
    data: FederatedData,
    guide=None,
    *,
    steps: int = 3000,
    lr: float = 0.05,
    lr_decay: float = 1.0,
    num_particles: int = 1,
    seed: int = 0,
) -> Tuple[Callable, List[float]]:
    """Fit ``model`` to the pooled data of all clients with plain Pyro SVI.

    :param guide: a guide for the whole model; ``AutoNormal(model)`` by default (the
        same mean-field family as the federated default).
    :param lr_decay: total decay of the learning rate over ``steps`` (ClippedAdam's
        per-step ``lrd`` is ``lr_decay ** (1 / steps)``).
    :returns: the fitted guide and the loss history.

    Example::

        >>> # guide, losses = fit_pooled_svi(model, FederatedData(clients), steps=2000)
    """
    batch = data.collate()
    optim = ClippedAdam({"lr": lr, "lrd": lr_decay ** (1.0 / steps)})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    losses = []
    with private_params(), seeded(seed):
        guide = AutoNormal(model) if guide is None else guide
        svi = SVI(model, guide, optim, elbo)
        for _ in range(steps):
            losses.append(svi.step(batch))
    return guide, losses


def pooled_elbo(
    model: Callable, guide: Callable, data: FederatedData, num_particles: int = 1000, seed: int = 0
) -> float:
    """A Monte Carlo estimate of the pooled ELBO of ``guide`` (Pyro's ``Trace_ELBO``)."""
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with private_params(), seeded(seed), torch.no_grad():
        return -float(elbo.loss(model, guide, data.collate()))


def joint_guide_of(fit) -> Callable:
    """The pooled joint guide ``q(phi) prod_i q_i(theta_i)`` holding a federated fit's values.

    The clients' local parameters are concatenated along the clients axis into one local
    guide over all clients (gradient mode only: the global factor is an autoguide).
    Used to evaluate a federated fit with Pyro's own pooled ELBO.
    """
    if fit.family is not None:
        raise NotImplementedError("joint_guide_of needs a gradient-mode fit")
    batch = fit.data.collate()
    template = next(iter(fit.clients.values())).local_guide
    with private_params():
        local = build_local_guide(fit.model, fit.structure, batch, type(template))
        states = [c.state_dict()["guide"] for c in fit.clients.values()]
        local.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
    global_guide = fit.server.global_guide

    def joint(data: Dict[str, torch.Tensor]):
        out = dict(global_guide(data))
        out.update(local(data))
        return out

    joint.local = local
    joint.global_guide = global_guide
    return joint


__all__ = ["fit_pooled_svi", "joint_guide_of", "pooled_elbo"]
