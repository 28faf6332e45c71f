"""The server strategy base: what every server does in a round, behind one interface.

A strategy owns ``q(phi)``. Each round :class:`~hbfl_pyro.FederatedSVI` asks it which
clients take part (:meth:`ServerStrategy.select`), what to send each
(:meth:`ServerStrategy.message`), and hands it the replies
(:meth:`ServerStrategy.aggregate`), which update ``q(phi)`` and return the round's record.
Its state is a plain dict (:meth:`ServerStrategy.state_dict`), so it checkpoints and
crosses a network boundary unchanged. This follows Flower's ``Strategy``
(``configure_train`` / ``aggregate_train``) with Pyro's naming.

Strategies: :class:`~hbfl_pyro.server.Server` (closed-form and gradient modes) and
:class:`~hbfl_pyro.servers.second_order.SecondOrderServer` (trust-region Newton on the
clients' summed Laplace marginals).
"""

from __future__ import annotations

import abc
from typing import Dict, List, Sequence, Tuple

import torch

from ..seeding import derive_seed


def select_indices(num_clients: int, fraction: float, seed: int, server_round) -> List[int]:
    """The indices of the clients sampled for a round: ``round(fraction * N)`` of them (at
    least one), sorted, drawn by ``torch.randperm`` with a generator seeded by
    ``derive_seed(seed, server_round, "select")`` and nothing else, so every method of a
    comparison (and every strategy, in-process or deep) sees the same clients.

    The one client selection of the package: :meth:`ServerStrategy.select` and the deep
    trainers (:func:`hbfl_pyro.deep.local.select_clients`) both call it.

    Example::

        >>> select_indices(10, 0.3, seed=0, server_round=1) == select_indices(10, 0.3, 0, 1)
        True
        >>> len(select_indices(10, 0.3, 0, 1)), select_indices(4, 1.0, 0, 1)
        (3, [0, 1, 2, 3])
    """
    k = max(1, int(round(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "select"))
    return torch.randperm(num_clients, generator=gen)[:k].sort().values.tolist()


class ServerStrategy(abc.ABC):
    """One server strategy (see the module docstring).

    :ivar client_names: every client's name, in the federation's order.
    :ivar fraction: the fraction of clients sampled per round.
    :ivar seed: the run's seed; a round's selection is seeded by ``(seed, round)``.
    """

    client_names: List[str]
    fraction: float
    seed: int

    #: A short name recorded in the report and checkpoints ("closed_form", ...).
    mode: str

    @property
    def num_clients(self) -> int:
        return len(self.client_names)

    #: Whether the fit has nothing left to do (a strategy with a stopping rule sets it).
    done: bool = False

    def select(self, server_round: int) -> List[str]:
        """The clients sampled for a round (seeded by ``(seed, round)``,
        :func:`select_indices`)."""
        chosen = select_indices(self.num_clients, self.fraction, self.seed, server_round)
        return [self.client_names[i] for i in chosen]

    @abc.abstractmethod
    def message(self, server_round: int, client: str) -> Dict:
        """What ``client`` is sent this round."""

    @abc.abstractmethod
    def aggregate(
        self, server_round: int, replies: Dict[str, Dict], failed: Sequence[str] = ()
    ) -> Dict:
        """Update ``q(phi)`` from the round's replies; returns the round's record."""

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """What this round's update needs of the replies when it can do with their *sum*
        over clients (secure aggregation): ``{path: shape}``, a path naming a reply entry
        (``"value"``, or ``"stats/count"`` for ``reply["stats"]["count"]``); each reply's
        ``elbo`` is summed too. A strategy that needs each client's own reply (the
        gradient server's Adam step, stale participation) raises
        ``NotImplementedError``, saying why."""
        raise NotImplementedError(
            f"the {self.mode} server needs each client's own reply; secure aggregation "
            "runs the closed-form and the second-order servers"
        )

    def aggregate_sum(
        self,
        server_round: int,
        total: Dict[str, torch.Tensor],
        clients: Sequence[str],
        failed: Sequence[str] = (),
    ) -> Dict:
        """Update ``q(phi)`` from the sum over ``clients`` of their replies' entries in
        :meth:`sum_layout` (and ``total["elbo"]``, the sum of their ELBO terms); returns the
        round's record, as :meth:`aggregate` does."""
        self.sum_layout(server_round)  # says why this strategy cannot
        raise NotImplementedError(f"{type(self).__name__}.aggregate_sum")

    @abc.abstractmethod
    def state_dict(self) -> Dict:
        """A snapshot of the server's state (plain dicts of tensors and numbers)."""

    @abc.abstractmethod
    def check_state(self, state: Dict) -> None:
        """Raise ``ValueError`` unless ``state`` was written by a server like this one."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict) -> None:
        """Continue from a state written by :meth:`state_dict`."""
