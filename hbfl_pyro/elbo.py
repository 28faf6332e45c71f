"""The blocks of the ELBO: the server's term and one term per client.

With ``q(phi, theta) = q(phi) prod_i q_i(theta_i)`` the ELBO splits exactly
(method.md §2)::

    ELBO = E_q[log p(phi) - log q(phi)]                                 (server term)
         + sum_i E_q[log p(theta_i|phi) + log p(D_i|theta_i,phi) - log q_i(theta_i)]
                                                                        (client terms)

Both are computed from ordinary Pyro traces (guide traced, model replayed against it) of
reparameterised guides; the per-client terms come out as a vector over the clients
plate, so one client, a batch of clients and the pooled data all use the same code.
Expectations are single- or multi-sample estimates over a vectorised particle plate, as
in Pyro's ``Trace_ELBO(vectorize_particles=True)``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Union, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .families.base import ClosedFormFamily
from .noise import MomentMatchedNoise
from .structure import ModelStructure, site_value

PARTICLE_PLATE = "_hbfl_particles"


def with_particles(
    fn: Callable, num_particles: int, max_plate_nesting: int, moment_matched: bool = False
) -> Callable:
    """Run ``fn`` inside a vectorised particle plate left of every model plate.

    :param moment_matched: draw Normal sites with moment-matched noise
        (:class:`~hbfl_pyro.noise.MomentMatchedNoise`); for guides only.
    """
    if num_particles == 1:
        return fn
    dim = -(max_plate_nesting + 1)

    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return MomentMatchedNoise(dim)(wrapped) if moment_matched else wrapped


def site_log_prob(site, family: Optional[ClosedFormFamily] = None, family_params=None):
    """A site's log density with its scale and mask applied (as Pyro's ``Trace`` does).

    For the local site of a closed-form family the density is replaced by its
    expectation under ``q(phi)`` (:meth:`ClosedFormFamily.expected_log_prior`).
    """
    fn, value = site["fn"], site["value"]
    if family is not None and site["name"] == family.local_site:
        event_dim = fn.event_dim
        batch_shape = value.shape[: value.dim() - event_dim]
        flat = value.reshape(batch_shape + (-1,))
        log_p = family.expected_log_prior(flat, family_params)
    else:
        log_p = fn.log_prob(value)
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _axis(log_p: torch.Tensor, site, plate: str) -> Optional[int]:
    for frame in site["cond_indep_stack"]:
        if frame.name == plate and log_p.dim() >= -frame.dim:
            return log_p.dim() + frame.dim
    return None


def _reduce(
    log_p: torch.Tensor, site, plate: Optional[str], num_clients: int, per_particle=False
) -> torch.Tensor:
    """Sum ``log_p`` over every dim but the clients plate; average over particles (or, with
    ``per_particle``, keep them as the first axis)."""
    p_axis = _axis(log_p, site, PARTICLE_PLATE)
    c_axis = _axis(log_p, site, plate) if plate is not None else None
    keep = [a for a in (p_axis, c_axis) if a is not None]
    drop = [d for d in range(log_p.dim()) if d not in keep]
    summed = log_p.sum(drop) if drop else log_p  # (torch sums everything for dim=[])
    if p_axis is not None and not per_particle:
        summed = summed.mean(0)
    if per_particle:
        if p_axis is None:  # a site without the particle axis: the same in every particle
            summed = summed.unsqueeze(0)
        if plate is None:
            return summed
        summed = summed.reshape(summed.shape[0], -1)
        if summed.shape[1] != num_clients:
            raise ValueError(
                f"site {site['name']!r}: expected {num_clients} client values, got shape "
                f"{tuple(summed.shape)}"
            )
        return summed
    if plate is None:
        return summed
    if c_axis is None:
        raise ValueError(
            f"site {site['name']!r} has no batch dimension for the clients plate; "
            "it must be sampled inside the plate"
        )
    if summed.shape != (num_clients,):
        raise ValueError(
            f"site {site['name']!r}: expected {num_clients} client values, got shape "
            f"{tuple(summed.shape)}"
        )
    return summed


def _guide_sites(trace):
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def client_terms(
    model: Callable,
    global_guide: Optional[Callable],
    local_guide: Callable,
    batch: Dict[str, torch.Tensor],
    structure: ModelStructure,
    num_clients: int,
    num_particles: int = 1,
    family: Optional[ClosedFormFamily] = None,
    family_params=None,
    moment_matched: bool = False,
    global_values: Optional[Dict[str, torch.Tensor]] = None,
    per_particle: bool = False,
    record: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """The clients' ELBO terms, a vector of length ``num_clients``.

    :param model: the user's model (in closed-form mode, conditioned on values of the
        global sites: they do not enter the objective, the family's expectation does).
    :param global_guide: ``q(phi)`` (gradient mode), or ``None`` (closed-form mode).
    :param local_guide: the clients' ``q_i(theta_i)``; every one of its sample sites,
        auxiliary ones included (``AutoNormal`` samples ``<site>_unconstrained``), counts
        towards ``log q_i``.
    :param batch: the collated data of these clients.
    :param moment_matched: use moment-matched guide noise (see :mod:`hbfl_pyro.noise`).
    :param global_values: the global sites' values, one per particle (as
        :func:`server_log_ratios` draws them): the global guide is held at them.
    :param per_particle: return ``(num_particles, num_clients)``, one log-ratio
        ``log p(theta_i, D_i | phi) - log q_i(theta_i | phi)`` per particle, instead of
        their average.
    :param record: if given, receives the local sites' drawn values (the draws the terms
        were computed at; the PSIS check weighs them).
    """
    nesting = structure.max_plate_nesting
    guide_trace = Trace()
    if global_guide is not None:
        if global_values is not None:
            global_guide = poutine.condition(global_guide, data=global_values)
        global_guide = with_particles(global_guide, num_particles, nesting, moment_matched)
        guide_trace = poutine.trace(global_guide).get_trace(batch)
        if global_values is not None:
            # Held values are draws of q(phi) made by the server, not data: replay needs
            # them as sampled sites.
            for name in global_values:
                guide_trace.nodes[name]["is_observed"] = False
    from .guides.base import is_conditional  # guides import this module

    if is_conditional(local_guide):
        # A structured factor q_i(theta_i | phi) reads this draw of the global sites.
        values = {name: guide_trace.nodes[name]["value"] for name in structure.global_sites}
        local_guide = partial(local_guide, globals=values)
    local_guide = with_particles(local_guide, num_particles, nesting, moment_matched)
    local_trace = poutine.trace(poutine.replay(local_guide, trace=guide_trace)).get_trace(batch)
    for name, node in local_trace.nodes.items():
        if name not in guide_trace.nodes:
            guide_trace.add_node(name, **node)
    model = with_particles(model, num_particles, nesting)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    total: Union[float, torch.Tensor] = 0.0
    reduce = partial(_reduce, plate=structure.plate, num_clients=num_clients)
    for name in structure.local_sites + structure.observed_sites:
        site = model_trace.nodes[name]
        log_p = site_log_prob(site, family, family_params)
        total = total + reduce(log_p, site, per_particle=per_particle)
    for site in _guide_sites(local_trace):
        total = total - reduce(site_log_prob(site), site, per_particle=per_particle)
    if record is not None:
        record.update({name: site_value(model_trace.nodes[name]) for name in structure.local_sites})
    return cast(torch.Tensor, total)  # a model has an observed site: a tensor was added


def server_term(
    model: Callable,
    global_guide: Callable,
    placeholder: Dict[str, torch.Tensor],
    structure: ModelStructure,
    num_particles: int = 1,
    moment_matched: bool = False,
) -> torch.Tensor:
    """``E_q[log p(phi) - log q(phi)]`` by Monte Carlo, for a guide of the global sites.

    The model runs on a data-free placeholder input (validation has shown the global
    sites' priors do not depend on client data); only the global sites are read.
    """
    ratios, _ = server_log_ratios(
        model, global_guide, placeholder, structure, num_particles, moment_matched
    )
    return ratios.mean(0)


def global_log_prior(
    model: Callable,
    placeholder: Dict[str, torch.Tensor],
    structure: ModelStructure,
    values: Dict[str, torch.Tensor],
    num_particles: int,
) -> torch.Tensor:
    """``log p(phi_s)`` of the model's global sites at ``num_particles`` given values
    (shaped as inside the particle plate): shape ``(num_particles,)``."""
    model = with_particles(
        poutine.condition(model, data=values), num_particles, structure.max_plate_nesting
    )
    # The placeholder's values need not lie in the likelihood's support: don't validate.
    with pyro.validation_enabled(False):
        trace = poutine.trace(model).get_trace(placeholder)
    total: Union[float, torch.Tensor] = 0.0
    for name in structure.global_sites:
        site = trace.nodes[name]
        total = total + _reduce(site_log_prob(site), site, None, 0, per_particle=True)
    return cast(torch.Tensor, total)


def server_log_ratios(
    model: Callable,
    global_guide: Callable,
    placeholder: Dict[str, torch.Tensor],
    structure: ModelStructure,
    num_particles: int = 1,
    moment_matched: bool = False,
):
    """``num_particles`` draws ``phi_s ~ q(phi)`` and their ``log p(phi_s) - log q(phi_s)``:
    ``((num_particles,), {global site: value})``, the values shaped as inside the particle
    plate (what :func:`client_terms`'s ``global_values`` takes)."""
    guide = with_particles(global_guide, num_particles, structure.max_plate_nesting, moment_matched)
    model = with_particles(model, num_particles, structure.max_plate_nesting)
    guide_trace = poutine.trace(guide).get_trace(placeholder)
    # The placeholder's values need not lie in the likelihood's support: don't validate.
    with pyro.validation_enabled(False):
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(placeholder)
    total: Union[float, torch.Tensor] = 0.0
    for name in structure.global_sites:
        site = model_trace.nodes[name]
        total = total + _reduce(site_log_prob(site), site, None, 0, per_particle=True)
    for site in _guide_sites(guide_trace):
        total = total - _reduce(site_log_prob(site), site, None, 0, per_particle=True)
    values = {name: guide_trace.nodes[name]["value"] for name in structure.global_sites}
    # Called for models with global sites: a tensor was added.
    return cast(torch.Tensor, total), values
