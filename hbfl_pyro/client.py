"""One client: its private data, its own ``q_i(theta_i)``, and its local update.

A client receives what its objective needs of the global factor, runs local SVI steps on
its own block of the ELBO, and replies. The reply holds only global-sized quantities:
the gradient of its block with respect to the global variational parameters (gradient
mode) or its sufficient summary of ``q_i`` (closed-form mode), its block's ELBO value,
and its number of examples. Its data and local parameters never leave it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from pyro import poutine

from .data import ClientData, collate
from .elbo import client_terms, with_particles
from .families.base import ClosedFormFamily
from .guides import GuideError, build_local_guide, copy_module, local_moments, private_params
from .guides.base import is_conditional
from .seeding import derive_seed, seeded
from .structure import ModelStructure


@dataclass
class LocalConfig:
    """How a client optimises its block.

    :ivar steps: local SVI steps per round.
    :ivar lr: Adam learning rate of the local steps in round 1.
    :ivar lr_decay: multiplicative decay of that rate per round the client takes part in
        (its ``k``-th update uses ``lr * lr_decay ** k``), so a client sampled rarely is
        not slowed by rounds it missed. The client's Adam state persists across rounds:
        a fresh Adam each round takes steps of size ``lr`` in the sign of a noisy
        gradient, a random walk that never settles.
    :ivar num_particles: Monte Carlo particles per local step.
    :ivar grad_particles: particles for the gradient sent to the server.
    :ivar moment_matched: moment-matched guide noise (:mod:`hbfl_pyro.noise`): exact
        expectations for Gaussian-quadratic blocks; needs ``num_particles >= 2``.
    """

    steps: int = 10
    lr: float = 0.05
    lr_decay: float = 1.0
    num_particles: int = 1
    grad_particles: int = 8
    moment_matched: bool = False


def local_objective(
    model: Callable,
    structure: ModelStructure,
    family: Optional[ClosedFormFamily],
    message: Dict,
    global_guide,
    local_guide,
    batch,
    num_clients: int,
    num_particles: int,
    moment_matched: bool = False,
) -> torch.Tensor:
    """The ELBO terms of ``num_clients`` clients (a vector) under the server's ``message``.

    Gradient mode: ``phi`` is drawn from the global guide (holding the message's
    parameters), so the terms are differentiable in them. Closed-form mode: the family's
    expectation ``E_q(phi)[log p(theta_i | phi)]`` replaces the local prior, and the global
    sites are held at a point value that enters nothing else.
    """
    if family is None:
        return client_terms(
            model,
            global_guide,
            local_guide,
            batch,
            structure,
            num_clients,
            num_particles,
            moment_matched=moment_matched,
        )
    params = message["family_params"]
    conditioned = poutine.condition(model, data=family.point_values(params))
    return client_terms(
        conditioned,
        None,
        local_guide,
        batch,
        structure,
        num_clients,
        num_particles,
        family,
        params,
        moment_matched=moment_matched,
    )


#: Draws of ``q(phi)`` behind a structured factor's centre (its mean of ``u(phi)``); the
#: recentring is exact whatever the draws, so their Monte Carlo error costs nothing.
CENTRE_DRAWS = 64


def recentre_local_guide(
    local_guide, global_guide, structure: ModelStructure, batch, message
) -> None:
    """Recentre a local factor that supports it (``StructuredLocalNormal.recentre``) at
    draws of this round's ``q(phi)``, seeded by the message (so the in-process and the
    vectorised engines draw the same centre), without touching the caller's RNG."""
    if global_guide is None or not is_conditional(local_guide):
        return
    with seeded(derive_seed(message["seed"], "centre")), torch.no_grad():
        guide = with_particles(global_guide, CENTRE_DRAWS, structure.max_plate_nesting)
        trace = poutine.trace(guide).get_trace(batch)
        values = {n: trace.nodes[n]["value"] for n in structure.global_sites}
        local_guide.recentre(values, data=batch)


class Client:
    """A federated client holding one client's data and local variational parameters.

    :param name: the client's name (used in every message and error).
    :param data: the client's own data ``{key: tensor}``.
    :param model: the shared Pyro model.
    :param structure: the model's site roles.
    :param global_guide: a template of ``q(phi)`` (deep-copied: the client owns its copy).
    :param local_guide: ``"auto"``, an autoguide class, or a PyroModule template.
    :param family: the closed-form family, or ``None`` in gradient mode.
    :param config: the :class:`LocalConfig`.
    :param dp: a :class:`~hbfl_pyro.dp.DPConfig`: the reply's summaries or gradients are
        clipped to its norm here, on the client, and no ELBO value is sent (``0.0``).
    """

    def __init__(
        self,
        name: str,
        data: ClientData,
        model: Callable,
        structure: ModelStructure,
        global_guide,
        local_guide,
        family: Optional[ClosedFormFamily],
        config: LocalConfig,
        per_client=(),
        dp=None,
    ):
        self.name = name
        self.dp = dp  # a hbfl_pyro.dp.DPConfig: clip the reply before it leaves
        self.data = data
        self.per_client = tuple(per_client)
        self._batch = collate([data], per_client=per_client)
        self._model = model
        self._structure = structure
        self._family = family
        self.config = config
        self.num_examples = int(self._batch["mask"].sum()) if "mask" in self._batch else 1
        self.global_guide = copy_module(global_guide) if global_guide is not None else None
        self.local_guide = build_local_guide(
            model, structure, self._batch, local_guide, client=name
        )
        if family is not None and is_conditional(self.local_guide):
            raise GuideError(
                f"client {name!r}: a local guide conditioned on the globals needs draws of "
                "phi, which a closed-form server does not send; use server='gradient'"
            )
        if family is not None:
            try:
                local_moments(self.local_guide, family.local_site)
            except NotImplementedError as exc:
                raise GuideError(
                    f"client {name!r}: the closed-form server needs the mean and variance of "
                    f"q_i at site {family.local_site!r}; use AutoNormal or AutoDelta as the "
                    "local guide, "
                    "or server='gradient'"
                ) from exc
        # A local guide without parameters (LaplaceLocalNormal: a deterministic map from phi
        # and the data) has nothing to optimise: no optimiser, no local steps.
        local = list(self.local_guide.parameters())
        self.optim = torch.optim.Adam(local, lr=config.lr) if local else None
        self.updates = 0  # rounds this client has taken part in
        # The local draws of the last PSIS check (psis_log_ratios), for psis_local_gaps.
        self._psis_locals: Dict[str, torch.Tensor] = {}

    @property
    def model(self) -> Callable:
        """The shared Pyro model."""
        return self._model

    @property
    def structure(self) -> ModelStructure:
        """The model's site roles."""
        return self._structure

    @property
    def family(self) -> Optional[ClosedFormFamily]:
        """The closed-form family of the server, or ``None`` (gradient mode)."""
        return self._family

    @property
    def batch(self):
        """This client's own data, collated as the model receives it (one client)."""
        return self._batch

    # ------------------------------------------------------------------ objective
    def _terms(self, message, num_particles: int) -> torch.Tensor:
        return local_objective(
            self._model,
            self._structure,
            self._family,
            message,
            self.global_guide,
            self.local_guide,
            self._batch,
            1,
            num_particles,
            self.config.moment_matched,
        )

    def elbo(self, message, num_particles: int = 64) -> float:
        """A Monte Carlo estimate of this client's ELBO term under ``message``."""
        with private_params(), torch.no_grad():
            self._load_global(message)
            return float(self._terms(message, num_particles).sum())

    def psis_log_ratios(self, message, global_values, num_draws: int) -> torch.Tensor:
        """This client's share of the PSIS check of a first-order fit: for each of the
        server's draws ``phi_s`` (``global_values``), one draw ``theta ~ q_i(theta | phi_s)``
        and ``log p(theta, D_i | phi_s) - log q_i(theta | phi_s)``: shape ``(num_draws,)``,
        one number per draw (an unbiased estimate of ``p(D_i | phi_s)`` once exponentiated).
        In closed-form mode the model itself is held at ``phi_s`` (its exact local prior,
        not the family's expectation the training objective uses).
        """
        with private_params(), torch.no_grad(), seeded(message["seed"]):
            self._load_global(message)
            model, global_guide, held = self._model, self.global_guide, global_values
            if global_guide is None:  # closed form: no q(phi) here, the draws are data
                model, held = poutine.condition(self._model, data=global_values), None
            self._psis_locals = {}
            terms = client_terms(
                model,
                global_guide,
                self.local_guide,
                self._batch,
                self._structure,
                1,
                num_draws,
                global_values=held,
                per_particle=True,
                record=self._psis_locals,
            )
        return terms[:, 0]

    def psis_local_gaps(self, weights: torch.Tensor) -> Dict[str, Tuple[float, float, float, int]]:
        """How far this client's ``q_i`` is from the PSIS-weighted posterior of its locals:
        ``{site: (largest |mean_q - mean_w| / sd_w, smallest and largest sd_q / sd_w,
        number of values)}`` over the site's values, from the draws of the last
        :meth:`psis_log_ratios` and the server's normalised ``weights`` (one per draw; they
        come from the sum over all clients, so the weighted moments are the joint
        posterior's)."""
        gaps = {}
        for site, value in self._psis_locals.items():
            flat = value.detach().double().reshape(len(weights), -1)
            w = weights.double()[:, None]
            q_mean, q_sd = flat.mean(0), flat.std(0)
            w_mean = (w * flat).sum(0)
            w_sd = (w * (flat - w_mean) ** 2).sum(0).clamp_min(1e-300).sqrt()
            ratio = q_sd / w_sd
            shift = float(((q_mean - w_mean).abs() / w_sd).max())
            gaps[site] = (shift, float(ratio.min()), float(ratio.max()), flat.shape[1])
        return gaps

    def _q_phi(self) -> torch.nn.Module:
        """The client's copy of ``q(phi)`` (gradient mode; a closed-form family has none)."""
        if self.global_guide is None:
            raise RuntimeError(f"client {self.name!r} holds no q(phi): closed-form mode")
        return self.global_guide

    def _load_global(self, message) -> None:
        if self._family is None:
            self._q_phi().load_state_dict(message["global_params"])

    # ------------------------------------------------------------------ the round
    def update(self, message: Dict) -> Dict:
        """Run the local steps of one round and return the reply to the server.

        If the update raises, the client's local state is rolled back to what it was
        before the round, so a crash leaves no half-trained parameters behind.
        """
        before = self.state_dict()
        try:
            return self._update(message)
        except BaseException:
            self.load_state_dict(before)
            raise

    def _update(self, message: Dict) -> Dict:
        with private_params(), seeded(message["seed"]):
            self._load_global(message)
            recentre_local_guide(
                self.local_guide, self.global_guide, self._structure, self._batch, message
            )
            local = list(self.local_guide.parameters())
            lr = self.config.lr * self.config.lr_decay**self.updates
            optim = self.optim
            if optim is not None:  # None: the local factor has no parameters (no steps)
                for group in optim.param_groups:
                    group["lr"] = lr
                for _ in range(self.config.steps):
                    loss = -self._terms(message, self.config.num_particles).sum()
                    optim.zero_grad()
                    loss.backward(inputs=local)
                    optim.step()
            self.updates += 1
            reply = {
                "client": self.name,
                "round": message["round"],
                "num_examples": self.num_examples,
            }
            if self._family is not None:
                mean, var = local_moments(self.local_guide, self._family.local_site)
                with torch.no_grad():
                    summary = self._family.client_summary(mean.detach(), var.detach())
                    reply["stats"] = {k: v.detach().clone() for k, v in summary.items()}
                    reply["elbo"] = float(self._terms(message, self.config.grad_particles).sum())
            else:
                names, params = zip(*self._q_phi().named_parameters())
                value = self._terms(message, self.config.grad_particles).sum()
                grads = torch.autograd.grad(-value, params, allow_unused=True)
                reply["grads"] = {
                    n: (torch.zeros_like(p) if g is None else g.detach())
                    for n, p, g in zip(names, params, grads)
                }
                reply["elbo"] = float(value.detach())
        if not math.isfinite(reply["elbo"]):
            reply["elbo"] = float("nan")
        if self.dp is not None:
            key = "stats" if self._family is not None else "grads"
            reply[key] = self.dp.clip_message(reply[key], f"client {self.name!r}")
            # The ELBO value is data-dependent and not clipped or noised: it is not sent.
            reply["elbo"] = 0.0
        return reply

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """The client's local variational parameters and optimiser state (kept locally)."""
        return {
            "guide": {k: v.detach().clone() for k, v in self.local_guide.state_dict().items()},
            "optim": copy.deepcopy(self.optim.state_dict()) if self.optim is not None else None,
            "updates": self.updates,
        }

    def load_state_dict(self, state: Dict) -> None:
        with private_params():
            self.local_guide.load_state_dict(state["guide"])
        if self.optim is not None:
            self.optim.load_state_dict(copy.deepcopy(state["optim"]))
        self.updates = state["updates"]
