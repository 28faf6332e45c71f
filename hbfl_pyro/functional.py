"""Pyro distributions made safe for ``torch.func`` while the library differentiates a model.

The second-order server evaluates the model under ``torch.func.vmap`` and takes
derivatives of it (:mod:`hbfl_pyro.laplace_marginal`). A distribution whose constructor
writes into a fresh tensor in place cannot run there: ``OrderedLogistic`` builds its
category probabilities with ``p[..., 0] = q[..., 0]`` into ``torch.zeros``, which vmap
refuses when ``q`` depends on the batched values. Ordinal models then fell back to the
gradient server (slow, and flagged). :func:`functional_distributions` swaps such
constructors, for the duration of a ``with`` block, for ones that compute the same
numbers without writing in place (``torch.cat`` of the same differences: equal bit for bit).

Example::

    >>> import torch, pyro.distributions as dist
    >>> from torch.func import vmap
    >>> def log_p(eta):
    ...     return dist.OrderedLogistic(eta, torch.tensor([-1.0, 1.0])).log_prob(torch.tensor(1))
    >>> with functional_distributions():
    ...     out = vmap(log_p)(torch.tensor([0.0, 0.5]))
    >>> torch.allclose(out, torch.stack([log_p(torch.tensor(0.0)), log_p(torch.tensor(0.5))]))
    True
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from pyro.distributions import Categorical, OrderedLogistic


def _ordered_logistic_init(self, predictor, cutpoints, validate_args=None):
    # OrderedLogistic.__init__ (Pyro 1.9) with the category masses concatenated, not
    # written into a zeros tensor: the same values, and no in-place write under vmap.
    q = torch.sigmoid(cutpoints - predictor.unsqueeze(-1))
    self.predictor = predictor.expand(q.shape[:-1])
    self.cutpoints = cutpoints.expand(q.shape)
    p = torch.cat([q[..., :1], q[..., 1:] - q[..., :-1], 1 - q[..., -1:]], dim=-1)
    Categorical.__init__(self, p, validate_args=validate_args)


@contextlib.contextmanager
def functional_distributions() -> Iterator[None]:
    """Within the block, distributions whose constructors write in place compute the same
    values without doing so (see the module docstring); restored on exit."""
    saved = OrderedLogistic.__init__
    OrderedLogistic.__init__ = _ordered_logistic_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        OrderedLogistic.__init__ = saved  # type: ignore[method-assign]


__all__ = ["functional_distributions"]
