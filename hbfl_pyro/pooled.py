"""The centralised reference: the same model and guide family fitted on pooled data.

This is what federated results are compared with (tests, reports). It uses plain Pyro:
``Trace_ELBO`` and ClippedAdam on the collated data of every client.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from .data import FederatedData
from .guides import build_local_guide, private_params, with_private_state
from .guides.joint import JointGuide
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
    progress: bool = False,
) -> Tuple[Callable, List[float]]:
    """Fit ``model`` to the pooled data of all clients with Pyro's ``Trace_ELBO``.

    :param guide: a guide module for the whole model (any Pyro autoguide, e.g.
        ``AutoMultivariateNormal(model)``); ``AutoNormal(model)`` by default (the same
        mean-field family as the federated default).
    :param lr_decay: total decay of the learning rate over ``steps`` (ClippedAdam's
        per-step ``lrd`` is ``lr_decay ** (1 / steps)``).
    :param progress: a progress bar (stderr).
    :returns: the fitted guide and the loss history.

    Example::

        >>> # guide, losses = fit_pooled_svi(model, FederatedData(clients), steps=2000)
    """
    batch = data.collate()
    with private_params(), seeded(seed):
        guide = AutoNormal(model) if guide is None else with_private_state(guide)
        with poutine.block(), torch.no_grad():
            guide(batch)  # an autoguide creates its parameters on its first call
    losses = svi_steps(
        model,
        guide,
        list(guide.parameters()),
        batch,
        steps=steps,
        lr=lr,
        lr_decay=lr_decay,
        num_particles=num_particles,
        seed=seed,
        progress=progress,
    )
    return guide, losses


def svi_steps(
    model: Callable,
    guide: Callable,
    params: Sequence[torch.nn.Parameter],
    batch: Dict[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    lr_decay: float = 1.0,
    num_particles: int = 1,
    seed: int = 0,
    progress: bool = False,
    before_step: Optional[Callable[[int], None]] = None,
) -> List[float]:
    """``steps`` steps of ``Trace_ELBO`` with ClippedAdam on the guide's own ``params``.

    The parameters live in the guide modules (module-local, as everywhere in this
    library) and are stepped directly: Pyro's ``SVI`` collects parameters through the
    param store's view, which misses plain ``nn.Parameter`` attributes such as
    ``AutoMultivariateNormal.loc``. ``lr_decay`` is the total decay over the run;
    ``before_step(step)``, if given, runs before each step (e.g. recentring a structured
    factor, as federated clients do each round).
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    losses = []
    with private_params(), seeded(seed):
        optim = ClippedAdam(params, lr=lr, lrd=lr_decay ** (1.0 / max(steps, 1)))
        bar = tqdm(range(steps), disable=not progress, desc="pooled SVI", unit="step")
        for step in bar:
            if before_step is not None:
                before_step(step)
            optim.zero_grad()
            loss = elbo.differentiable_loss(model, guide, batch)
            loss.backward()
            optim.step()
            losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(elbo=f"{-losses[-1]:.3f}")
    return losses


def pooled_elbo(
    model: Callable, guide: Callable, data: FederatedData, num_particles: int = 1000, seed: int = 0
) -> float:
    """A Monte Carlo estimate of the pooled ELBO of ``guide`` (Pyro's ``Trace_ELBO``)."""
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with private_params(), seeded(seed), torch.no_grad():
        return -float(elbo.loss(model, guide, data.collate()))


def joint_guide_of(fit) -> JointGuide:
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
    return JointGuide(fit.server.global_guide, local)


class PooledJointGuide(JointGuide):
    """Deprecated alias (one release) of :class:`~hbfl_pyro.guides.joint.JointGuide`, the
    one joint guide (its ``local`` attribute is the local guide)."""

    def __init__(self, global_guide, local_guide):
        warnings.warn(
            "PooledJointGuide is deprecated: use hbfl_pyro.guides.joint.JointGuide",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(global_guide, local_guide)


__all__ = ["PooledJointGuide", "fit_pooled_svi", "joint_guide_of", "pooled_elbo", "svi_steps"]
