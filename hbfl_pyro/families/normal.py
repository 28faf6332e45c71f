"""The Normal–Normal family with known variance, and its detection in a model.

Model::

    mu            ~ Normal(mu0, s0)          global (scalar or vector, per coordinate)
    theta_i | mu  ~ Normal(mu, tau)          local, tau a known constant
    D_i | theta_i ~ any likelihood that does not use mu

With ``q(mu) = Normal(m, s)`` the server's block is maximised exactly by::

    1/s^2 = 1/s0^2 + N/tau^2,     m = s^2 (mu0/s0^2 + sum_i E_{q_i}[theta_i] / tau^2)

which needs only the sum over clients of the clients' means.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.distributions import Independent, Normal
from torch.distributions import kl_divergence

from ..data import FederatedData
from ..structure import ModelStructure, site_value
from .base import ClosedFormFamily, Params


def _base(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


class NormalNormal(ClosedFormFamily):
    """Conjugate Normal prior on a location shared by Normal local sites of known scale.

    :param global_site: the model's site ``mu``.
    :param local_site: the model's site ``theta``.
    :param prior_loc: ``mu0``, shape ``(d,)``.
    :param prior_scale: ``s0``, shape ``(d,)``.
    :param scale: ``tau``, shape ``(d,)``.
    :param site_shape: the shape of one value of ``mu`` in the model.

    Example::

        >>> import torch
        >>> fam = NormalNormal("mu", "theta", torch.zeros(1), torch.ones(1), torch.ones(1), ())
        >>> sums = fam.client_summary(torch.tensor([2.0]), torch.tensor([0.1]))
        >>> fam.server_update(sums, num_clients=1)["loc"]
        tensor([1.])
    """

    covariance = "diag"

    def __init__(self, global_site, local_site, prior_loc, prior_scale, scale, site_shape):
        self.global_sites = (global_site,)
        self.local_site = local_site
        self.prior_loc = prior_loc
        self.prior_scale = prior_scale
        self.scale = scale
        self.site_shape = torch.Size(site_shape)

    def init_params(self) -> Params:
        return {"loc": self.prior_loc.clone(), "scale": self.prior_scale.clone()}

    def client_summary(self, mean, cov) -> Params:
        return {"sum_mean": mean, "count": torch.ones(())}

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        precision = self.prior_scale.pow(-2) + num_clients / self.scale.pow(2)
        loc = (
            self.prior_loc / self.prior_scale.pow(2) + sums["sum_mean"] / self.scale.pow(2)
        ) / precision
        return {"loc": loc, "scale": precision.rsqrt()}

    def expected_log_prior(self, theta, params: Params):
        # E_{N(mu; m, s)} log N(theta; mu, tau) = log N(theta; m, tau) - s^2 / (2 tau^2)
        log_p = Normal(params["loc"], self.scale).log_prob(theta)
        return (log_p - params["scale"].pow(2) / (2 * self.scale.pow(2))).sum(-1)

    def neg_kl(self, params: Params):
        q = Normal(params["loc"], params["scale"])
        return -kl_divergence(q, Normal(self.prior_loc, self.prior_scale)).sum()

    def point_values(self, params: Params) -> Params:
        return {self.global_sites[0]: params["loc"].reshape(self.site_shape)}

    def sample_posterior(self, params: Params, num_samples: int) -> Params:
        draws = Normal(params["loc"], params["scale"]).sample((num_samples,))
        return {self.global_sites[0]: draws.reshape((num_samples,) + self.site_shape)}

    def log_posterior(self, params: Params, draws: Params) -> torch.Tensor:
        flat = draws[self.global_sites[0]].reshape(-1, params["loc"].numel())
        return Normal(params["loc"], params["scale"]).log_prob(flat).sum(-1)

    # ------------------------------------------------------------------ detection
    @classmethod
    def detect(
        cls, model: Callable, structure: ModelStructure, data: FederatedData
    ) -> Optional["NormalNormal"]:
        """The family if ``model`` has exactly its shape, else ``None``.

        Checked on traces: one global site with a Normal prior of constant parameters,
        one local site ``Normal(mu, tau)`` whose location moves one-for-one with ``mu``
        and whose scale does not, and ``mu`` absent from the likelihood.
        """
        if len(structure.global_sites) != 1 or len(structure.local_sites) != 1:
            return None
        if structure.likelihood_globals:
            return None
        g, loc_site = structure.global_sites[0], structure.local_sites[0]
        batch = data.collate([0])
        trace = poutine.trace(model).get_trace(batch)
        prior, local = _base(trace.nodes[g]["fn"]), _base(trace.nodes[loc_site]["fn"])
        if not (type(prior) is Normal and type(local) is Normal):
            return None
        mu = site_value(trace.nodes[g])
        shifted = poutine.trace(poutine.condition(model, data={g: mu + 1.0})).get_trace(batch)
        local2 = _base(shifted.nodes[loc_site]["fn"])
        d = max(mu.numel(), 1)
        try:
            loc1 = local.loc.expand(local.batch_shape).reshape(-1, d)
            loc2 = local2.loc.expand(local2.batch_shape).reshape(-1, d)
            tau1 = local.scale.expand(local.batch_shape).reshape(-1, d)
            tau2 = local2.scale.expand(local2.batch_shape).reshape(-1, d)
        except RuntimeError:
            return None
        if not (torch.allclose(loc2 - loc1, torch.ones_like(loc1)) and torch.equal(tau1, tau2)):
            return None
        if not torch.allclose(loc1, mu.reshape(1, d).expand_as(loc1)):
            return None
        if not torch.allclose(tau1, tau1[:1].expand_as(tau1)):
            return None
        shape = mu.shape
        flat = lambda t: t.expand(shape).reshape(d).clone()  # noqa: E731
        return cls(g, loc_site, flat(prior.loc), flat(prior.scale), tau1[0].clone(), shape)
