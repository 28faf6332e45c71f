"""The engine interface: how a round's messages reach the clients and their replies return.

:class:`~hbfl_pyro.FederatedSVI` runs every round the same way, whatever the transport
(the round loop, :func:`~hbfl_pyro.rounds.federated_round`): the server strategy selects
clients and writes their messages, an :class:`Engine` delivers them and collects the
replies, and the strategy aggregates them. Engines differ only in where the clients run:
one after another in this process
(:class:`~hbfl_pyro.engines.InProcessEngine`), batched in one pass
(:class:`~hbfl_pyro.engines.VectorisedEngine`,
:class:`~hbfl_pyro.engines.BatchedMarginalEngine`), or on Flower nodes
(:class:`~hbfl_pyro.flower.engine.FlowerEngine`), and a secure aggregation engine returns
only the replies' sum (:class:`SecureSum`; :class:`~hbfl_pyro.flower.secagg.SecAggEngine`),
which the server turns into its update with
:meth:`~hbfl_pyro.servers.base.ServerStrategy.aggregate_sum`. The deep trainers' rounds
run through the same loop with :class:`~hbfl_pyro.engines.deep.DeepEngine` (their
clients' replies are rows of batched tensors). This is the split of Flower's
``Strategy`` (what to send, how to aggregate) and its ``Grid`` (the transport).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Union

#: ``{client name: why it failed}`` for the clients of a round that sent no usable reply.
Failures = Dict[str, str]


@dataclass
class SecureSum:
    """A round's replies as secure aggregation delivers them: only their sum.

    :ivar total: ``{path: sum over clients}`` for the paths of the server's
        :meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout`, and ``"elbo"``.
    :ivar clients: the clients in the sum.
    :ivar record: what the engine adds to the round's record (e.g. ``{"secagg": ...}``).
    """

    total: Dict[str, Any]
    clients: List[str]
    record: Dict[str, Any] = field(default_factory=dict)


#: What an engine returns for a round's replies: one per client, or only their sum.
Replies = Union[Dict[str, Dict], SecureSum]


class Engine(abc.ABC):
    """Delivers one round's messages and collects the replies."""

    @abc.abstractmethod
    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Replies, Failures]:
        """Send ``{client name: message}``; return ``(replies, failures)``.

        ``replies`` holds one reply per client that answered, in the order of
        ``messages`` (the server sums them in that order, so every engine does the same
        floating-point operations), or, under secure aggregation, a :class:`SecureSum`;
        ``failures`` names each client that did not answer, with the reason. A client's
        failure is reported, not raised: the server decides whether enough answered. An
        engine raises only when every client failed with an exception (a bug in the model
        or guide, not a fault of the network).
        """


__all__ = ["Engine", "Failures", "Replies", "SecureSum"]
