"""The engine interface: how a round's messages reach the clients and their replies return.

:class:`~hbfl_pyro.FederatedSVI` runs every round the same way, whatever the transport:
the server strategy selects clients and writes their messages, an :class:`Engine` delivers
them and collects the replies, and the strategy aggregates them. Engines differ only in
where the clients run: one after another in this process
(:class:`~hbfl_pyro.engines.InProcessEngine`), batched in one pass
(:class:`~hbfl_pyro.engines.VectorisedEngine`,
:class:`~hbfl_pyro.engines.BatchedMarginalEngine`), or on Flower nodes
(:class:`~hbfl_pyro.flower.engine.FlowerEngine`). This is the split of Flower's
``Strategy`` (what to send, how to aggregate) and its ``Grid`` (the transport).
"""

from __future__ import annotations

import abc
from typing import Dict, Tuple

#: ``{client name: why it failed}`` for the clients of a round that sent no usable reply.
Failures = Dict[str, str]


class Engine(abc.ABC):
    """Delivers one round's messages and collects the replies."""

    @abc.abstractmethod
    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], Failures]:
        """Send ``{client name: message}``; return ``(replies, failures)``.

        ``replies`` holds one reply per client that answered, in the order of
        ``messages`` (the server sums them in that order, so every engine does the same
        floating-point operations); ``failures`` names each client that did not answer,
        with the reason. A client's failure is reported, not raised: the server decides
        whether enough clients answered. An engine raises only when every client failed
        with an exception (a bug in the model or guide, not a fault of the network).
        """


__all__ = ["Engine", "Failures"]
