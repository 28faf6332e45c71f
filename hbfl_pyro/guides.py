"""The two factors of the guide: ``q(phi)`` (server) and ``q_i(theta_i)`` (client i).

Guides are :class:`~pyro.nn.PyroModule` objects (every Pyro autoguide is one). The
library runs them with ``pyro.settings.context(module_local_params=True)`` so that
their parameters live in the module, never in Pyro's global parameter store: each party
owns a private copy (architecture rule 5), and a state dict of plain tensors is what
crosses between parties.

By default the global factor is an :class:`~pyro.infer.autoguide.AutoNormal` over the
global sites and the local factor an ``AutoNormal`` over the local sites, both built from
the model blocked to those sites (Pyro autoguides "split by role"). Users may pass any
autoguide class (``AutoDelta``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``
for the global factor) or their own ``PyroModule`` guides taking the model's arguments.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Dict, Tuple

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoNormal
from pyro.poutine.util import site_is_subsample

from .data import num_clients
from .structure import ModelStructure


@contextmanager
def private_params():
    """Keep PyroModule parameters inside their modules (no shared param store)."""
    with pyro.settings.context(module_local_params=True):
        yield


class GuideError(ValueError):
    """A guide does not match the model."""


def _clients_plate(structure: ModelStructure):
    def create_plates(batch, *args, **kwargs):
        return pyro.plate(structure.plate, num_clients(batch), dim=structure.plate_dim)

    return create_plates


def build_global_guide(model: Callable, structure: ModelStructure, placeholder, guide="auto"):
    """The server's ``q(phi)``: an autoguide class / ``"auto"`` or a user module."""
    blocked = poutine.block(model, expose=list(structure.global_sites))
    if guide == "auto":
        guide = AutoNormal
    if isinstance(guide, type) and issubclass(guide, AutoGuide):
        guide = guide(blocked)
    with private_params(), pyro.validation_enabled(False):
        trace = poutine.trace(guide).get_trace(placeholder)
    _check_covers(trace, structure.global_sites, "global", structure)
    return guide


def build_local_guide(model: Callable, structure: ModelStructure, batch, guide="auto"):
    """Client ``i``'s own ``q_i(theta_i)``: a fresh module prototyped on its own data.

    A user-supplied module is deep-copied, so no two clients share parameters.
    """
    blocked = poutine.block(model, expose=list(structure.local_sites))
    if guide == "auto":
        guide = AutoNormal
    if isinstance(guide, type) and issubclass(guide, AutoGuide):
        guide = guide(blocked, create_plates=_clients_plate(structure))
    else:
        guide = copy.deepcopy(guide)
    with private_params():
        trace = poutine.trace(guide).get_trace(batch)
    _check_covers(trace, structure.local_sites, "local", structure)
    return guide


def _check_covers(trace, sites: Tuple[str, ...], role: str, structure: ModelStructure) -> None:
    sampled = {
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    missing = [s for s in sites if s not in sampled]
    if missing:
        raise GuideError(
            f"the {role} guide does not sample the model's {role} site(s) {missing}; "
            f"add `pyro.sample` statements for them to the {role} guide (or use an autoguide)"
        )
    other_role = structure.local_sites if role == "global" else structure.global_sites
    extra = [s for s in sampled if s in other_role or s in structure.observed_sites]
    if extra:
        raise GuideError(
            f"the {role} guide samples site(s) {extra} that are not {role} in the model; "
            "the global guide must cover exactly the global sites, the local guide the local ones"
        )
    for name in sites:
        if not trace.nodes[name]["fn"].has_rsample:
            raise GuideError(
                f"the {role} guide's site {name!r} is not reparameterisable; "
                "hbfl_pyro's blocks use pathwise gradients (use a continuous guide)"
            )


def parameters(guide) -> Dict[str, torch.Tensor]:
    """The guide's (unconstrained) parameters by name."""
    return dict(guide.named_parameters())


def local_moments(guide, site: str, num_samples: int = 4000) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and diagonal variance of ``q_i(theta_i)`` for one client, flattened to ``(d,)``.

    Exact for ``AutoNormal`` (real support) and ``AutoDelta``; a Monte Carlo estimate
    from ``num_samples`` draws otherwise.
    """
    with private_params():
        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale(site)
            return loc.reshape(-1), scale.pow(2).reshape(-1)
        if isinstance(guide, AutoDelta):
            loc = getattr(guide, site) if hasattr(guide, site) else guide.median()[site]
            return loc.reshape(-1), torch.zeros_like(loc).reshape(-1)
        raise NotImplementedError(
            "closed-form server families need the moments of q_i; use AutoNormal or AutoDelta "
            "as the local guide"
        )
