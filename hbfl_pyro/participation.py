"""Partial participation, shared by the core's server and the deep trainers.

When a round hears only some clients ``S`` of ``N``, the server update needs the sum over
all clients of their replies (summaries, statistics, gradients). Two ways to get it:

- ``"scaled"``: the round's sum times ``N / |S|`` (:func:`scale_factor`), an unbiased
  estimate of the sum over all clients;
- ``"stale"``: every client's latest reply is kept (:func:`pool_replies`) and the sum is
  over all clients heard so far (times ``N / |pool|``, 1 once every client was heard).

:class:`~hbfl_pyro.Server` (its ``gather`` / ``update``) and the deep trainers
(:class:`~hbfl_pyro.deep.FedHB`, :class:`~hbfl_pyro.deep.FedHBMixture`) use these
functions, so both mean the same by the same word. Their defaults differ, by design:
the core uses ``"stale"`` for a closed-form server and ``"scaled"`` for a gradient one;
deep FedHB ``"scaled"``, the mixture ``"stale"`` (see their docs).

Example::

    >>> stale = {}
    >>> pool_replies("stale", stale, {"a": 1, "b": 2})
    {'a': 1, 'b': 2}
    >>> pool_replies("stale", stale, {"b": 3})  # b's latest reply replaces its first
    {'a': 1, 'b': 3}
    >>> pool_replies("scaled", stale, {"b": 3})
    {'b': 3}
    >>> scale_factor(10, 4)
    2.5
"""

from __future__ import annotations

from typing import Dict, Hashable, TypeVar

#: The ways a server can treat partial participation.
PARTICIPATION = ("scaled", "stale")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def check_participation(participation: str) -> str:
    """``participation`` if it is one of :data:`PARTICIPATION`, else a ``ValueError``."""
    if participation not in PARTICIPATION:
        raise ValueError(f"participation must be 'scaled' or 'stale', got {participation!r}")
    return participation


def pool_replies(participation: str, stale: Dict[K, R], replies: Dict[K, R]) -> Dict[K, R]:
    """The replies a round's update sums over: under ``"scaled"`` the round's ``replies``;
    under ``"stale"`` the pool ``stale`` (each client's latest reply, updated in place with
    ``replies``; a client keeps its place in it, new clients come last)."""
    if participation == "stale":
        stale.update(replies)
        return stale
    return replies


def scale_factor(num_clients: int, pool_size: int) -> float:
    """``N / |pool|``: what a pool's sum is multiplied by to stand for all ``N`` clients."""
    return num_clients / pool_size


__all__ = ["PARTICIPATION", "check_participation", "pool_replies", "scale_factor"]
