"""The global sites as one flat vector in unconstrained space.

A second-order server works on ``z``, the concatenation of every global site's value
mapped to unconstrained space by ``biject_to(support).inv`` (Pyro's and NumPyro's
convention). :class:`GlobalLayout` maps ``z`` to the sites' constrained values and back,
and gives the log-Jacobian that turns a density in ``phi`` into one in ``z``.

Example::

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def prior():
    ...     pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     pyro.sample("tau", dist.HalfNormal(1.0))
    >>> layout = GlobalLayout.from_trace(poutine.trace(prior).get_trace(), ["mu", "tau"])
    >>> layout.dim
    2
    >>> sorted(layout.constrain(torch.zeros(2)).items())
    [('mu', tensor(0.)), ('tau', tensor(1.))]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch.distributions import biject_to, constraints


@dataclass(frozen=True)
class _Site:
    name: str
    support: constraints.Constraint
    shape: Tuple[int, ...]  # the constrained value's shape
    free_shape: Tuple[int, ...]  # its unconstrained shape
    start: int
    stop: int


def is_continuous(support: constraints.Constraint) -> bool:
    """Whether a site with this support has an unconstrained parametrisation."""
    try:
        biject_to(support)
    except NotImplementedError:
        return False
    return not getattr(support, "is_discrete", False)


class GlobalLayout:
    """Where each global site sits in the flat unconstrained vector ``z``.

    :param sites: ``(name, support, value)`` per global site, in model order.
    """

    def __init__(self, sites: Sequence[Tuple[str, constraints.Constraint, torch.Tensor]]):
        self.sites: List[_Site] = []
        start = 0
        for name, support, value in sites:
            if not is_continuous(support):
                raise NotImplementedError(
                    f"global site {name!r} is discrete (support {support}); a second-order "
                    "server needs continuous globals"
                )
            free = biject_to(support).inv(value.detach())
            stop = start + free.numel()
            self.sites.append(
                _Site(name, support, tuple(value.shape), tuple(free.shape), start, stop)
            )
            start = stop
        self.dim = start

    @classmethod
    def from_trace(cls, trace, names: Sequence[str]) -> "GlobalLayout":
        """The layout of the sites ``names`` as they appear in a Pyro trace."""
        return cls([(n, trace.nodes[n]["fn"].support, trace.nodes[n]["value"]) for n in names])

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.sites]

    def labels(self) -> List[str]:
        """One label per coordinate of ``z``: ``"site"`` or ``"site[i]"`` (unconstrained)."""
        out = []
        for s in self.sites:
            size = s.stop - s.start
            out += (
                [s.name]
                if size == 1 and not s.free_shape
                else [f"{s.name}[{i}]" for i in range(size)]
            )
        return out

    def constrain(self, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The constrained value of every global site at ``z`` (shape ``(dim,)``)."""
        return {
            s.name: biject_to(s.support)(z[s.start : s.stop].reshape(s.free_shape))
            for s in self.sites
        }

    def unconstrain(self, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``z`` from draws ``{site: (n, *shape)}``: shape ``(n, dim)``."""
        parts = []
        for s in self.sites:
            value = values[s.name]
            lead = value.shape[: value.dim() - len(s.shape)]
            free = biject_to(s.support).inv(value)
            parts.append(free.reshape(tuple(lead) + (-1,)))
        return torch.cat(parts, -1)

    def constrain_draws(self, z: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Constrained draws ``{site: (n, *shape)}`` from rows of ``z`` (shape ``(n, dim)``)."""
        out = {}
        for s in self.sites:
            free = z[:, s.start : s.stop].reshape((z.shape[0],) + s.free_shape)
            out[s.name] = biject_to(s.support)(free)
        return out

    def log_abs_det_jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """``log |d phi / d z|`` at ``z`` (shape ``(dim,)``)."""
        total = z.new_zeros(())
        for s in self.sites:
            free = z[s.start : s.stop].reshape(s.free_shape)
            transform = biject_to(s.support)
            total = total + transform.log_abs_det_jacobian(free, transform(free)).sum()
        return total
