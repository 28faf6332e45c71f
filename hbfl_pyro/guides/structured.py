"""A structured local guide ``q_i(theta_i | phi)``: beyond mean-field across the hierarchy.

Mean-field VI, ``q(phi) prod_i q_i(theta_i)``, cannot represent how a client's local
variables move with the globals — in eight schools, how each school's effect widens with
the population spread ``tau`` — and so understates the spread of both. This guide keeps
the federated split (client ``i`` still owns all parameters of its factor) but lets the
local factor's mean and log-scale depend linearly on the globals, in unconstrained space::

    z_i = a_i + B_i u(phi) + s_i exp(C_i u(phi)) * eps,     theta_i = T(z_i),

where ``u(phi)`` stacks the unconstrained global values and ``T`` maps to the local site's
support. It is the Gaussian family with the conditional structure of the posterior
(Hoffman & Blei, "Structured stochastic variational inference", AISTATS 2015), and it
needs the gradient server: the client's block depends on ``q(phi)`` only through draws.
The scale term matters as much as the mean: in eight schools (non-centred) a school's
``theta_trans`` is pinned by its datum when ``tau`` is large and free when ``tau`` is
small, and a fixed scale forces ``q(tau)`` narrow (sd ratio 0.77 against the reference,
0.89-0.95 with the scale term over three seeds; ``tests/test_eight_schools_reference.py``).
``B_i`` and ``C_i`` start at zero, i.e. at the mean-field factor, and ``u(phi)`` is centred
at ``q(phi)``'s mean at the start of each of the client's rounds (:meth:`recentre`: an exact
change of coordinates, for the optimiser's sake). Set the class attribute
``scale_on_globals = False`` (in a subclass) for the mean-only form.

Example::

    >>> # FederatedSVI(model, clients, local_guide=StructuredLocalNormal, server="gradient")
"""

from __future__ import annotations

from typing import Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch.distributions import biject_to
from torch.distributions.utils import _sum_rightmost

from ..structure import ModelStructure
from .base import ConditionalLocalGuide


class StructuredLocalNormal(ConditionalLocalGuide):
    """``q_i(theta_i | phi)``: a Normal in unconstrained space, mean and log-scale linear
    in ``phi``.

    Build it through :class:`~hbfl_pyro.FederatedSVI` by passing the class as
    ``local_guide``; :meth:`for_client` makes one per client from the client's own data.

    :param model: the Pyro model.
    :param structure: its site roles.
    :param batch: the collated data the guide is prototyped on (one client, or a batch).
    """

    #: Whether the log of the scale is linear in ``u(phi)`` too (see the class docstring).
    scale_on_globals = True

    def __init__(self, model, structure: ModelStructure, batch, init_scale: float = 0.1):
        super().__init__()
        self._plate, self._plate_dim = structure.plate, structure.plate_dim
        self._num_clients = next(iter(batch.values())).shape[0]
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
            trace = poutine.trace(model).get_trace(batch)
        self._globals = {}
        size = 0
        for name in structure.global_sites:
            site = trace.nodes[name]
            unconstrained = biject_to(site["fn"].support).inv(site["value"])
            # The unconstrained shape: it differs from the value's for e.g. a Cholesky factor.
            self._globals[name] = (site["fn"].support, unconstrained.shape)
            size += unconstrained.numel()
        self._size = size
        self._locals = {}
        self.locs, self.slopes, self.scales = PyroModule(), PyroModule(), PyroModule()
        self.scale_slopes = PyroModule()
        # The point the features are centred at (buffers, not parameters: see recentre).
        self.centres = torch.nn.Module()
        for name in structure.local_sites:
            site = trace.nodes[name]
            transform = biject_to(site["fn"].support)
            init = transform.inv(site["value"].detach())
            if init.shape != site["value"].shape:
                raise NotImplementedError(
                    f"StructuredLocalNormal needs local site {name!r} to keep its shape in "
                    "unconstrained space (real, positive or interval support)"
                )
            event_dim = site["fn"].event_dim
            self._locals[name] = (site["fn"].support, event_dim)
            setattr(self.locs, name, PyroParam(torch.zeros_like(init), constraints.real, event_dim))
            setattr(
                self.slopes,
                name,
                PyroParam(init.new_zeros(init.shape + (size,)), constraints.real, event_dim + 1),
            )
            if self.scale_on_globals:
                zeros = init.new_zeros(init.shape + (size,))
                setattr(self.scale_slopes, name, PyroParam(zeros, constraints.real, event_dim + 1))
            self.centres.register_buffer(name, init.new_zeros(init.shape + (size,)))
            setattr(
                self.scales,
                name,
                PyroParam(
                    torch.full_like(init, init_scale), constraints.softplus_positive, event_dim
                ),
            )

    @classmethod
    def for_client(cls, model, structure: ModelStructure, batch) -> "StructuredLocalNormal":
        """A fresh guide prototyped on ``batch`` (the library calls this per client)."""
        return cls(model, structure, batch)

    def _features(self, values: Optional[Dict[str, torch.Tensor]]):
        """``u(phi)``: unconstrained globals, flattened, with any leading (particle) dims."""
        if values is None:  # shape checks only: the factor at u = 0
            return torch.zeros(self._size)
        parts = []
        for name, (support, shape) in self._globals.items():
            value = biject_to(support).inv(values[name])
            lead = value.shape[: value.dim() - len(shape)]
            parts.append(value.reshape(lead + (-1,)))
        lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], -1)

    @torch.no_grad()
    def recentre(self, globals: Dict[str, torch.Tensor], data=None) -> None:
        """Centre the features at the mean of ``u`` over draws of the globals, leaving the
        distribution unchanged.

        The factor is ``a + B (u - c)`` and ``s exp(C (u - c))``: moving the centre ``c``
        to ``c'`` and ``a``, ``s`` to ``a + B (c' - c)``, ``s exp(C (c' - c))`` changes
        nothing but the coordinates. Centred at ``q(phi)``'s current mean, ``a`` and ``s``
        are the factor at typical globals and no longer trade off against ``B u`` and
        ``C u`` along a ridge when a global sits far from zero (eight schools' ``mu`` ~ 4),
        which made the optimiser slow. The library calls this at the start of each of the
        client's rounds, with draws from that round's ``q(phi)``.

        :param globals: draws of the global sites, with any leading (particle) dims.
        :param data: unused (the centre depends on ``phi`` only); the signature is shared
            with :meth:`~hbfl_pyro.LaplaceLocalNormal.recentre`.
        """
        centre = self._features(globals).reshape(-1, self._size).mean(0)
        for name in self._locals:
            old = getattr(self.centres, name)
            shift = centre - old
            loc = getattr(self.locs, name)
            loc.add_((getattr(self.slopes, name) * shift).sum(-1))
            if self.scale_on_globals:
                scale = (
                    getattr(self.scales, name)
                    * (getattr(self.scale_slopes, name) * shift).sum(-1).exp()
                )
                unconstrained = getattr(self.scales, f"{name}_unconstrained")
                unconstrained.copy_(biject_to(constraints.softplus_positive).inv(scale))
            old.copy_(centre.expand_as(old))

    def forward(self, data, globals: Optional[Dict[str, torch.Tensor]] = None):
        u = self._features(globals)
        lead = u.shape[:-1]
        out = {}
        with pyro.plate(self._plate, self._num_clients, dim=self._plate_dim):
            for name, (support, event_dim) in self._locals.items():
                loc = getattr(self.locs, name)
                slope = getattr(self.slopes, name)
                scale = getattr(self.scales, name)
                # Right-align the globals' leading dims with the site's batch dims.
                u_site = u.reshape(lead + (1,) * event_dim + u.shape[-1:])
                u_site = u_site - getattr(self.centres, name)
                mean = loc + (slope * u_site).sum(-1)
                if self.scale_on_globals:
                    scale = scale * (getattr(self.scale_slopes, name) * u_site).sum(-1).exp()
                z = pyro.sample(
                    f"{name}_unconstrained",
                    dist.Normal(mean, scale).to_event(event_dim),
                    infer={"is_auxiliary": True},
                )
                transform = biject_to(support)
                value = transform(z)
                # The transform already sums over its own event dims (one for a
                # real_vector support, none for an elementwise one): sum the rest.
                log_det = _sum_rightmost(
                    transform.inv.log_abs_det_jacobian(value, z),
                    event_dim - transform.codomain.event_dim,
                )
                out[name] = pyro.sample(
                    name, dist.Delta(value, log_density=log_det, event_dim=event_dim)
                )
        return out
