"""The joint guide ``q(phi) prod_i q_i(theta_i | phi)`` over the pooled model, in one place.

What :func:`~hbfl_pyro.compare.compare_pooled` fits on the pooled data and what
:func:`~hbfl_pyro.pooled.joint_guide_of` assembles from a federated fit are the same
object: the global factor's draws first, then the local factor's, given those draws when
it is a :class:`~hbfl_pyro.guides.base.ConditionalLocalGuide` (as Pyro's ``AutoGuideList``
runs its parts in order, each seeing the values before it).

Example::

    >>> import pyro, torch, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(data):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("clients", 2):
    ...         pyro.sample("theta", dist.Normal(mu, 1.0))
    >>> g = AutoNormal(pyro.poutine.block(model, expose=["mu"]))
    >>> q = AutoNormal(pyro.poutine.block(model, expose=["theta"]))
    >>> sorted(JointGuide(g, q)({}))
    ['mu', 'theta']
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import is_conditional


class JointGuide:
    """``q(phi) q(theta | phi)``: a global and a local guide joined.

    A plain callable holding the two modules (Pyro does not let a module that has already
    run, as both have while being checked against the model, become a submodule).

    :param global_guide: a guide of the global sites.
    :param local_guide: a guide of the local sites of all clients (one batch).
    """

    def __init__(self, global_guide: Any, local_guide: Any):
        self.global_guide = global_guide
        self.local_guide = local_guide

    @property
    def local(self) -> Any:
        """The local guide (the name :class:`~hbfl_pyro.pooled.PooledJointGuide` used)."""
        return self.local_guide

    def __call__(self, data: Dict[str, torch.Tensor]):
        out = dict(self.global_guide(data))
        if is_conditional(self.local_guide):
            out.update(self.local_guide(data, globals=out))
        else:
            out.update(self.local_guide(data))
        return out


__all__ = ["JointGuide"]
