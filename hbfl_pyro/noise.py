"""Moment-matched Monte Carlo noise for reparameterised Normal guide sites.

With ``K >= 2`` particles, the standard-normal noise of each Normal guide site is
recentred and rescaled along the particle axis so that its sample mean is exactly 0 and
its sample variance exactly 1 (moment matching, a classical variance-reduction scheme;
e.g. Glasserman, *Monte Carlo Methods in Financial Engineering*, §4.5). For integrands
that are a sum of quadratics in single latent coordinates — a closed-form client block
with a Gaussian local factor and Gaussian likelihood, where ``phi`` is integrated
analytically — the Monte Carlo ELBO and its gradient are then *exact*, so a client's
local optimisation converges to its block's optimum rather than hovering at Monte Carlo
noise. Products of two sampled coordinates (``theta * mu`` when both are drawn) keep
their sampling error, since only each coordinate's own moments are matched. For other
integrands the estimate is consistent, with an ``O(1/K)`` bias.
"""

from __future__ import annotations

import torch
from pyro.distributions import Independent, Normal
from pyro.poutine.messenger import Messenger


class MomentMatchedNoise(Messenger):
    """Draw Normal guide sites with moment-matched noise along the particle axis.

    :param particle_dim: the (negative) batch dim of the particle plate.

    Use it outside the particle plate, so sites are fully broadcast when it sees them.
    """

    def __init__(self, particle_dim: int):
        super().__init__()
        self.particle_dim = particle_dim

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["done"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        base = fn
        while isinstance(base, Independent):
            base = base.base_dist
        if type(base) is not Normal:
            return
        axis = len(fn.batch_shape) + self.particle_dim
        shape = base.batch_shape
        if axis < 0 or shape[axis] < 2:
            return
        eps = torch.randn(shape, dtype=base.loc.dtype, device=base.loc.device)
        eps = eps - eps.mean(axis, keepdim=True)
        eps = eps / eps.pow(2).mean(axis, keepdim=True).sqrt()
        msg["value"] = base.loc + base.scale * eps
        msg["done"] = True
