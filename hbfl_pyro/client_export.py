"""The client side of the ArviZ export: what each client computes on its own data.

:func:`evaluate_client` replays the model on one client's data, conditioned on draws of
``q(phi)`` and of the client's own ``q_i``, and returns the log density of its
observations (summed, or one per observation) and replicated observations;
:func:`client_marginal_log_likelihood` returns ``log p(D_i | phi)``, the local sites
integrated out by importance sampling. :func:`~hbfl_pyro.to_inference_data`
(:mod:`hbfl_pyro.export`) gathers these into an :class:`arviz.InferenceData`; in a
deployment each client would run them itself and send only what they return.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .elbo import PARTICLE_PLATE, site_log_prob, with_particles
from .guides import private_params
from .replay import batched_or_looped, client_values
from .seeding import derive_seed, seeded
from .structure import ModelStructure, site_distribution, site_value
from .summary import drop_broadcast_dims


def inner_plates(site, structure: ModelStructure) -> List[str]:
    """Plates of a site other than the clients plate and the particle plate."""
    return [
        f.name
        for f in site["cond_indep_stack"]
        if f.name not in (structure.plate, PARTICLE_PLATE) and f.dim is not None
    ]


def _keep_mask(site, batch_shape, clients_axis: int) -> Optional[torch.Tensor]:
    """The site's mask for one client as a flat boolean vector, or ``None`` (keep all)."""
    mask = site["mask"]
    if mask is None or mask is True:
        return None
    mask = torch.as_tensor(mask, dtype=torch.bool).expand(batch_shape)
    return mask[0].select(clients_axis - 1, 0).reshape(-1)


def evaluate_client(
    model: Callable,
    structure: ModelStructure,
    batch: Dict[str, torch.Tensor],
    global_draws: Mapping[str, torch.Tensor],
    own_local_draws: Mapping[str, torch.Tensor],
    seed: int,
    pointwise: bool = False,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """What one client computes, on its own data, for the ArviZ export.

    The model is replayed once on the client's data, vectorised over the draws and
    conditioned on the draws of the global sites and of this client's local sites.
    For each observed site it returns the log density of the client's data and a
    replicated data set drawn from the site's distribution.

    This is the client side of :func:`~hbfl_pyro.to_inference_data`: in a deployment the server
    sends the draws of ``q(phi)`` (or ``q(phi)`` and a seed), the client draws its own
    local sites and replies with the ``"log_likelihood"`` and ``"posterior_predictive"``
    entries, and ``"observed"`` only if it opts in to pointwise values.

    :param model: the Pyro model.
    :param structure: the model's :class:`~hbfl_pyro.ModelStructure`.
    :param batch: the client's own collated data (one client).
    :param global_draws: ``{site: (n, *shape)}``, draws of ``q(phi)``.
    :param own_local_draws: ``{site: (n, *shape)}``, this client's draws of ``q_i``
        (clients axis removed, as ``FederatedSVI.local_samples(n)[site][:, i]``).
    :param seed: seed of the replicated data.
    :param pointwise: return one log density per observation instead of their sum.
    :returns: ``{"log_likelihood": {site: t}, "posterior_predictive": {site: t},
        "observed": {site: t}, "per_observation": {site: bool}}``. Per-observation sites
        (inside a plate nested in the clients plate) have their batch dims flattened to
        one observation axis: ``log_likelihood`` ``(n,)`` summed, or ``(n, n_obs)``
        pointwise; replicated data ``(n, n_obs, *event)``. Per-client sites: ``(n,)`` and
        ``(n, *shape)``.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> fit = FederatedSVI(model, {"a": {"y": torch.tensor(1.0)},
        ...                            "b": {"y": torch.tensor(2.0)}})
        >>> _ = fit.run(progress=False)
        >>> g, loc = fit.global_samples(50), fit.local_samples(50)
        >>> out = evaluate_client(fit.model, fit.structure, fit.clients["a"].batch, g,
        ...                       {s: v[:, 0] for s, v in loc.items()}, seed=0)
        >>> out["log_likelihood"]["y"].shape, out["posterior_predictive"]["y"].shape
        (torch.Size([50]), torch.Size([50]))
    """
    static: Dict[str, Dict[str, Any]] = {}

    def computation(draws: Dict[str, torch.Tensor], index) -> Dict[str, torch.Tensor]:
        # Draw j computed alone gets its own seed, so replicated data stay independent.
        out = _evaluate(
            model,
            structure,
            batch,
            {site: draws[site] for site in global_draws},
            {site: draws[site] for site in own_local_draws},
            seed if index is None else derive_seed(seed, "draw", index),
            pointwise,
            plain=index is not None,
        )
        if index is None or not static:  # not from a vmapped run (batched tensors)
            static.update(observed=out["observed"], per_observation=out["per_observation"])
        flat = {f"log_likelihood/{k}": v for k, v in out["log_likelihood"].items()}
        flat.update({f"random:{k}": v for k, v in out["posterior_predictive"].items()})
        return flat

    flat = batched_or_looped(
        computation, {**global_draws, **own_local_draws}, "the ArviZ export's model replay"
    )
    return {
        "log_likelihood": {
            k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("log_likelihood/")
        },
        "posterior_predictive": {
            k[len("random:") :]: v for k, v in flat.items() if k.startswith("random:")
        },
        "observed": static["observed"],
        "per_observation": static["per_observation"],
    }


def _evaluate(
    model: Callable,
    structure: ModelStructure,
    batch: Dict[str, torch.Tensor],
    global_draws: Mapping[str, torch.Tensor],
    own_local_draws: Mapping[str, torch.Tensor],
    seed: int,
    pointwise: bool,
    plain: bool = False,
) -> Dict[str, Dict[str, Any]]:
    """:func:`evaluate_client` with every draw in one particle plate (``plain``: one draw,
    the model run as under plain Pyro, without one)."""
    nesting = structure.max_plate_nesting
    first = next(iter(list(global_draws.values()) + list(own_local_draws.values())))
    num_samples = first.shape[0]
    values = client_values(global_draws, own_local_draws, structure, plain=plain)
    run = poutine.condition(model, data=values)
    if not plain:
        run = with_particles(run, num_samples, nesting)
    with private_params(), torch.no_grad(), seeded(seed):
        with pyro.validation_enabled(False):
            trace = poutine.trace(run).get_trace(batch)
        out: Dict[str, Dict[str, Any]] = {
            "log_likelihood": {},
            "posterior_predictive": {},
            "observed": {},
            "per_observation": {},
        }
        # The clients axis among the batch dims (the particle dim is batch dim 0).
        clients_axis = nesting + 1 + structure.plate_dim
        for name in structure.observed_sites:
            site = trace.nodes[name]
            fn = site_distribution(site)
            event_dim = fn.event_dim
            batch_shape = tuple(fn.batch_shape)
            event_shape = tuple(fn.event_shape)
            # A plain run has no particle dim and maybe fewer plate dims: pad them (size 1).
            lead = (1,) * (nesting + 1 - len(batch_shape)) if plain else ()
            full = lead + batch_shape + event_shape
            # log densities as the ELBO sees them: the site's scale and mask applied.
            log_p = site_log_prob(site).expand(batch_shape).reshape(lead + batch_shape)
            batch_shape = lead + batch_shape
            if (site["infer"] or {}).get("is_auxiliary") or isinstance(fn, dist.Unit):
                # pyro.factor: part of the likelihood, with no data to replicate.
                out["log_likelihood"][name] = log_p.reshape(num_samples, -1).sum(-1)
                out["per_observation"][name] = False
                continue
            replicated = fn.sample().reshape(full)
            observed = site_value(site).expand(full[len(lead) :]).reshape(full)[0]
            log_p = log_p.select(clients_axis, 0)
            replicated = replicated.select(clients_axis, 0)
            observed = observed.select(clients_axis - 1, 0)
            per_obs = bool(inner_plates(site, structure))
            out["per_observation"][name] = per_obs
            if per_obs:
                event_shape = tuple(fn.event_shape)
                keep = _keep_mask(site, batch_shape, clients_axis)
                log_p = log_p.reshape(num_samples, -1)
                replicated = replicated.reshape((num_samples, -1) + event_shape)
                observed = observed.reshape((-1,) + event_shape)
                if keep is not None:
                    log_p, replicated, observed = (
                        log_p[:, keep],
                        replicated[:, keep],
                        observed[keep],
                    )
                log_lik = log_p if pointwise else log_p.sum(-1)
            else:
                log_lik = log_p.reshape(num_samples, -1).sum(-1)
                replicated = drop_broadcast_dims(replicated, 1, event_dim)
                observed = drop_broadcast_dims(observed[None], 1, event_dim)[0]
            out["log_likelihood"][name] = log_lik
            out["posterior_predictive"][name] = replicated
            if pointwise:
                out["observed"][name] = observed
    return out


def client_marginal_log_likelihood(
    model: Callable,
    structure: ModelStructure,
    batch: Dict[str, torch.Tensor],
    global_draws: Mapping[str, torch.Tensor],
    local_guide,
    num_inner: int,
    seed: int,
) -> torch.Tensor:
    """``log p(D_i | phi)`` per draw of ``phi``, the local sites integrated out, on client i.

    Importance sampling with the client's own ``q_i`` as the proposal::

        log p(D_i | phi) ~= logsumexp_k [log p(theta_k | phi) + log p(D_i | theta_k, phi)
                                         - log q_i(theta_k)] - log K,   theta_k ~ q_i

    with ``K = num_inner`` draws per draw of ``phi`` (all ``n * K`` in one vectorised
    run). This is the likelihood for leave-one-*client*-out: leaving client i out
    changes ``q(phi)`` only a little, so PSIS-LOO on it is usually reliable, while the
    conditional ``log p(D_i | theta_i, phi)`` has ``theta_i`` informed mostly by ``D_i``
    itself (Merkle, Furr & Rabe-Hesketh, 2019, "Bayesian comparison of latent variable
    models: conditional versus marginal likelihoods"). The estimate is biased low by
    ``O(1/K)`` (Jensen); ``q_i`` close to ``p(theta_i | D_i, phi)`` keeps that small.

    :param local_guide: the client's ``q_i`` (a guide of the local sites on ``batch``).
    :param num_inner: importance draws ``K`` per draw of ``phi``.
    :returns: a tensor ``(n,)``.
    """
    nesting = structure.max_plate_nesting
    num_samples = next(iter(global_draws.values())).shape[0]
    total = num_samples * num_inner
    # Particle j = i * K + k pairs draw i of phi with inner draw k of theta.
    repeated = {s: v.repeat_interleave(num_inner, 0) for s, v in global_draws.items()}
    values = client_values(repeated, {}, structure)
    guide = with_particles(local_guide, total, nesting)
    run = with_particles(poutine.condition(model, data=values), total, nesting)
    with private_params(), torch.no_grad(), seeded(seed):
        guide_trace = poutine.trace(guide).get_trace(batch)
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.replay(run, trace=guide_trace)).get_trace(batch)

    def per_particle(site) -> torch.Tensor:
        log_p = site_log_prob(site)
        return log_p.expand(site["fn"].batch_shape).reshape(total, -1).sum(-1)

    log_w = torch.zeros(total, dtype=torch.get_default_dtype())
    for name in structure.local_sites + structure.observed_sites:
        log_w = log_w + per_particle(trace.nodes[name])
    for site in guide_trace.nodes.values():
        # Every guide sample site, auxiliary ones included (AutoNormal), is part of log q_i.
        if site["type"] == "sample" and not site_is_subsample(site):
            log_w = log_w - per_particle(site)
    log_w = log_w.reshape(num_samples, num_inner)
    return torch.logsumexp(log_w, -1) - math.log(num_inner)


__all__ = [
    "client_marginal_log_likelihood",
    "client_values",
    "evaluate_client",
    "inner_plates",
]
