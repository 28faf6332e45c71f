"""Prediction for clients the federation has not seen (method.md §7).

Two tasks, both using the learned global factor ``q(phi)`` as the population's knowledge:

- :func:`new_client_predictive`: before a new client has fitted anything, the
  population predictive of its local sites, ``p(theta_new) = ∫ p(theta | phi) q(phi) dphi``:
  draws of ``phi`` from ``q(phi)``, then the model's own prior of the local sites given
  each draw, on a one-client input (the new client's covariates, or a data-free
  placeholder).
- :func:`personalise`: a new client fits its own ``q(theta_new)`` on its own data with
  ``q(phi)`` as the prior, exactly as a federated client does in a round (the same
  :class:`~hbfl_pyro.client.Client` objective), but on a fresh client object. Nothing is
  sent back: the server's state and every existing client are left unchanged. After a
  second-order fit the new client is a :class:`~hbfl_pyro.MarginalClient`, as the
  federation's are: its locals are drawn from their conditional posterior given its data
  at each posterior draw of the globals (nothing is optimised).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Dict, Mapping, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide

from .client import Client
from .data import FederatedData, collate
from .elbo import with_particles
from .guides import private_params
from .guides.base import is_conditional
from .laplace_marginal import MarginalClient, psis_noise
from .replay import pad_batch
from .seeding import derive_seed, seeded
from .structure import ModelStructure, site_distribution, site_value
from .summary import deterministic_samples


def _new_client_data(fit, data: Mapping) -> Dict[str, torch.Tensor]:
    """The new client's data, validated as the federation's clients' were."""
    validated = FederatedData({"new": dict(data)}, per_client=fit.data.per_client)[0]
    expected = sorted(k for k in fit.data.placeholder() if k != "mask")
    if sorted(validated) != expected:
        raise ValueError(
            f"the new client's data has keys {sorted(validated)}, but the federation's "
            f"clients have {expected}; give the new client the same keys"
        )
    return validated


def _per_client_value(value: torch.Tensor, site, structure: ModelStructure, num_samples: int):
    """A site's value from a one-client run under the particle plate, as ``(n, *shape)``
    without the clients axis: the layout of ``FederatedSVI.local_samples(n)[site][:, i]``."""
    nesting = structure.max_plate_nesting
    event_dim = site["fn"].event_dim
    if site["infer"].get("_deterministic") and event_dim >= value.dim():
        # pyro.deterministic makes the whole value an event unless told otherwise.
        event_dim = max(value.dim() - (nesting + 1), 0)
    batch_dims = value.dim() - event_dim
    value = value.reshape((1,) * max(nesting + 1 - batch_dims, 0) + tuple(value.shape))
    value = value.expand((num_samples,) + tuple(value.shape[1:]))
    return value.select(nesting + 1 + structure.plate_dim, 0)


def new_client_predictive(
    fit, num_samples: int = 1000, seed: int = 0, data: Optional[Mapping] = None
) -> Dict[str, torch.Tensor]:
    """Draws of an unseen client's local sites from ``∫ p(theta | phi) q(phi) dphi``.

    The model runs once, vectorised over ``num_samples`` draws of ``q(phi)``, on a
    one-client input, conditioned on those draws; its local sites are then sampled from
    their prior given ``phi`` (the model's own ``p(theta | phi)``, whatever its form).
    Deterministic sites inside the clients plate are recorded too (e.g. the non-centred
    eight schools' ``theta``). With ``data`` (a new client's covariates), observed sites
    are also drawn: the prior predictive of that client's outcomes.

    :param fit: a :class:`~hbfl_pyro.FederatedSVI`.
    :param num_samples: number of draws.
    :param seed: seed of the draws (the caller's random state is left untouched).
    :param data: optional ``{key: array}`` of the new client, with the federation's keys
        (outcome values are only placeholders: they are not conditioned on).
    :returns: ``{site: (num_samples, *shape)}`` for every local site, deterministic site
        inside the clients plate and (with ``data``) observed site; shapes as
        ``fit.local_samples(n)[site][:, i]`` (the clients axis removed).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(5)}
        >>> fit = FederatedSVI(model, clients, seed=0)
        >>> _ = fit.run(5, progress=False)
        >>> draws = new_client_predictive(fit, num_samples=4000)
        >>> draws["theta"].shape
        torch.Size([4000])
        >>> bool(draws["theta"].std() > 2.0)  # tau plus the uncertainty of mu
        True
    """
    structure: ModelStructure = fit.structure
    n = num_samples
    if data is None:
        batch = fit.data.placeholder()
    else:
        batch = collate([_new_client_data(fit, data)], per_client=fit.data.per_client)
    nesting = structure.max_plate_nesting
    event_dims = dict(structure.event_dims)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        global_draws = fit.global_samples(num_samples)
    values = {
        site: pad_batch(v, v.shape[1:], event_dims.get(site, 0), nesting, site)
        for site, v in global_draws.items()
    }
    run = with_particles(poutine.condition(fit.model, data=values), num_samples, nesting)
    # The placeholder's values need not lie in the likelihood's support: don't validate.
    with private_params(), torch.no_grad(), seeded(derive_seed(seed, "new_client")):
        with pyro.validation_enabled(False):
            trace = poutine.trace(run).get_trace(batch)
        wanted = list(structure.local_sites) + [
            s
            for s in structure.deterministic_sites
            if any(f.name == structure.plate for f in trace.nodes[s]["cond_indep_stack"])
        ]
        out = {
            site: _per_client_value(site_value(trace.nodes[site]), trace.nodes[site], structure, n)
            for site in wanted
        }
        if data is not None:
            for site in structure.observed_sites:
                node = trace.nodes[site]
                out[site] = _per_client_value(site_distribution(node).sample(), node, structure, n)
    return out


@dataclasses.dataclass
class Personalised:
    """A new client's own fit: its client object and what it learned.

    :ivar name: the new client's name.
    :ivar client: the client: a :class:`~hbfl_pyro.client.Client` (its ``local_guide`` is
        ``q(theta_new)``) after a first-order fit, a :class:`~hbfl_pyro.MarginalClient`
        (its locals' conditional modes found at the posterior mean of the globals) after
        a second-order one.
    :ivar structure: the model's site roles.
    :ivar elbo: the client's ELBO term after fitting (a Monte Carlo estimate). Second
        order: ``E[log p(D_new | phi)]`` over the fit's posterior draws of the globals,
        each term importance-sampled in the locals (the Laplace marginal when the server
        has ``local_draws=0``): the ELBO term whose ``q(theta_new | phi)`` is the exact
        conditional posterior.
    :ivar fit: the federation whose ``q(phi)`` the draws are paired with.
    """

    name: str
    client: Any  # Client, or MarginalClient after a second-order fit
    structure: ModelStructure
    elbo: float
    fit: Any = None

    def sample(self, num_samples: int = 1000, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Joint draws of ``q(phi) q(theta_new)``, reported for the new client: its local
        sites and the model's deterministic sites computed from them (e.g. ``theta = mu +
        tau * theta_trans`` of a non-centred model): ``{site: (num_samples, *shape)}``
        (clients axis removed). A structured ``q(theta_new | phi)`` draws conditionally on
        the paired ``phi``.

        After a second-order fit the globals are the fit's own draws
        (:meth:`~hbfl_pyro.FederatedSVI.global_samples`: PSIS-resampled once its PSIS round
        has run, the same for the same ``num_samples``), and each draw's locals come from
        the new client's conditional posterior given its data at that draw (its Laplace
        factor, resampled by importance weights from the server's ``local_draws``, as
        :meth:`~hbfl_pyro.FederatedSVI.local_samples` draws the federation's clients);
        ``seed`` seeds the locals' draws.

        Example::

            >>> personal.sample(500)["theta"].shape  # doctest: +SKIP
            torch.Size([500])
        """
        if isinstance(self.client, MarginalClient):
            global_draws, draws = self._second_order_draws(num_samples, seed)
        else:
            global_draws, draws = self._first_order_draws(num_samples, seed)
        if self.structure.deterministic_sites:
            local = {site: v.unsqueeze(1) for site, v in draws.items()}
            found = deterministic_samples(
                self.fit.model, {self.name: self.client.batch}, global_draws, local, self.structure
            )
            for site, per_client in found.items():
                if self.name in per_client:  # sites inside the clients plate only
                    draws[site] = per_client[self.name]
        return draws

    def _first_order_draws(self, num_samples: int, seed: int):
        """Draws of ``q(phi)`` and of the new client's ``q(theta_new)`` paired with them."""
        from .svi import draw_from_guide, particle_shaped

        guide = self.client.local_guide
        with seeded(seed):
            global_draws = self.fit.global_samples(num_samples)
            if is_conditional(guide):
                values = {n: particle_shaped(v, n, self.structure) for n, v in global_draws.items()}
                guide = partial(guide, globals=values)
            draws = draw_from_guide(
                guide, self.client.batch, self.structure, num_samples, self.structure.plate
            )
        return global_draws, draws

    def _second_order_draws(self, num_samples: int, seed: int):
        """The fit's draws of the globals, and the new client's locals drawn at each."""
        fit = self.fit
        global_draws = fit.global_samples(num_samples)
        z = fit.layout.unconstrain({name: global_draws[name] for name in fit.layout.names})
        found = self.client.sample_locals(
            z, derive_seed(seed, "personalise-locals", self.name), fit.server.local_draws or 1
        )
        # {site: (S, 1, *shape)} -> (S, *shape): the clients axis removed.
        return global_draws, {site: value[:, 0] for site, value in found.items()}


def personalise(
    fit,
    client_data: Mapping,
    steps: int = 500,
    lr: float = 0.05,
    seed: int = 0,
    *,
    name: str = "new",
    local_guide=None,
    num_particles: Optional[int] = None,
) -> Personalised:
    """Fit a new client's ``q(theta_new)`` on its own data, with ``q(phi)`` as its prior.

    The new client gets the server's current message (``fit.server.message``), builds
    its own :class:`~hbfl_pyro.client.Client` (a fresh local guide, its own optimiser)
    and runs ``steps`` local steps on its block of the ELBO,
    ``E_q[log p(theta_new | phi) + log p(D_new | theta_new, phi) - log q(theta_new)]``
    (closed-form mode: ``E_q(phi)[log p(theta_new | phi)]`` in closed form). It is a
    personalisation, not a round: its reply is discarded, so the server's ``q(phi)``,
    its optimiser, the history and every existing client are unchanged (tested
    byte for byte).

    :param fit: a :class:`~hbfl_pyro.FederatedSVI`, usually fitted.
    :param client_data: the new client's ``{key: array}``, with the federation's keys.
    :param steps: local Adam steps.
    :param lr: their step size.
    :param seed: seed of the guide's initialisation and of the steps' noise.
    :param name: the new client's name.
    :param local_guide: the local guide; default: a fresh guide of the class the
        federation's clients use (required when that is a user module, whose copy would
        start from another client's parameters).
    :param num_particles: particles per step (default: the federation's clients').
        The federation's ``moment_matched`` setting is kept.
    :returns: a :class:`Personalised`.

    After a second-order fit (:class:`~hbfl_pyro.SecondOrderServer`) there is no local
    guide to optimise: the new client is a :class:`~hbfl_pyro.MarginalClient` on its own
    data, as the federation's clients are, whose locals' conditional modes are found at
    the posterior mean of the globals; :meth:`Personalised.sample` then draws, for each
    posterior draw of the globals, the new client's locals from their conditional
    posterior given its data. ``steps``, ``lr`` and ``seed`` play no part there
    (``Personalised.sample``'s seed seeds the draws); ``local_guide`` and
    ``num_particles`` are refused.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(5)}
        >>> fit = FederatedSVI(model, clients, seed=0)
        >>> _ = fit.run(5, progress=False)
        >>> personal = personalise(fit, {"y": torch.tensor(7.0)}, steps=200, lr=0.1)
        >>> personal.sample(1000)["theta"].shape
        torch.Size([1000])
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if name in fit.clients:
        raise ValueError(
            f"{name!r} is already a client of the federation; give the new client another name"
        )
    if fit.server.mode == "second_order":
        return _personalise_second_order(fit, client_data, seed, name, local_guide, num_particles)
    template = next(iter(fit.clients.values()))
    if local_guide is None:
        # Autoguides and guide classes with a for_client constructor (the structured and
        # Laplace factors) are rebuilt fresh for the new client from its own data.
        if not isinstance(template.local_guide, AutoGuide) and not is_conditional(
            template.local_guide
        ):
            raise ValueError(
                "the federation's clients use a custom local guide module; pass a fresh one "
                "as local_guide= (a copy of an existing client's would start from its "
                "parameters)"
            )
        local_guide = type(template.local_guide)
    own_data = _new_client_data(fit, client_data)
    config = dataclasses.replace(
        template.config,
        steps=steps,
        lr=lr,
        lr_decay=1.0,
        num_particles=template.config.num_particles if num_particles is None else num_particles,
    )
    # The server's current message, as a client would receive it; the seed of the
    # local steps is the new client's own.
    message = fit.server.message(fit.round, name)
    message["seed"] = derive_seed(seed, "personalise", name)
    with private_params(), seeded(derive_seed(seed, "personalise-init", name)):
        client = Client(
            name,
            own_data,
            fit.model,
            fit.structure,
            fit.server.global_guide,  # deep-copied by the client; None in closed-form mode
            local_guide,
            fit.family,
            config,
            fit.data.per_client,
        )
    client.update(message)
    with seeded(derive_seed(seed, "personalise-elbo", name)):
        elbo = client.elbo(message, num_particles=256)
    return Personalised(name, client, fit.structure, elbo, fit)


#: Draws of the globals behind a second-order :attr:`Personalised.elbo`.
ELBO_DRAWS = 256


def _personalise_second_order(fit, client_data, seed, name, local_guide, num_particles):
    """:func:`personalise` after a second-order fit (see its docstring)."""
    for given, option in ((local_guide, "local_guide"), (num_particles, "num_particles")):
        if given is not None:
            raise ValueError(
                f"{option}= is for first-order fits: after a second-order fit the new "
                "client's locals are drawn from their conditional posterior given its data "
                "(a Laplace factor, importance-resampled), with no local guide to optimise; "
                f"drop {option}=, or fit the federation with a first-order server "
                "(server='gradient') to personalise a guide"
            )
    post = fit.server.posterior
    if post is None:
        raise ValueError(
            "the second-order fit has no posterior yet: run it (fit.run()) before personalising"
        )
    own_data = _new_client_data(fit, client_data)
    client = MarginalClient(
        name, own_data, fit.model, fit.structure, fit.layout, fit.data.per_client
    )
    # Its locals' conditional modes at the posterior mean of the globals, where later
    # draws start their Newton searches (moved along the modes' slope), as a federation
    # client keeps them from its last Newton round.
    centre = post["mean"].detach().clone()
    client.start = client.marginal.modes(centre, client.start)
    if not bool(torch.isfinite(client.start).all()):
        raise ValueError(
            f"the new client's conditional mode of its local sites is not finite at the "
            f"posterior mean of the globals; check its data ({sorted(own_data)})"
        )
    client.centre = centre
    # E[log p(D_new | phi)] over the fit's posterior draws of the globals.
    draws = fit.global_samples(ELBO_DRAWS)
    z = fit.layout.unconstrain({n: draws[n] for n in fit.layout.names})
    local_draws = fit.server.local_draws
    message = {
        "draws": z,
        "local_draws": local_draws,
        "seed": derive_seed(seed, "personalise-elbo", name),
    }
    noise = psis_noise(message, client.marginal.size) if local_draws else None
    log_lik = client.marginal.values(
        z, client.start, client.centre, client.slope_at_centre(), noise
    )
    return Personalised(name, client, fit.structure, float(log_lik.mean()), fit)


__all__ = ["Personalised", "new_client_predictive", "personalise"]
