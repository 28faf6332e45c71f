"""The round loop: one federated round, written once for every fit of the package.

:meth:`FederatedSVI.step <hbfl_pyro.FederatedSVI.step>` and the deep trainers'
:meth:`FederatedTrainer.step <hbfl_pyro.deep.FederatedTrainer.step>` each run a round
by calling :func:`federated_round` with their own parts::

    chosen            = select(round)                    # which clients take part
    messages          = write(round, chosen)             # {client: what it is sent}
    replies, failures = engine.run_round(messages)       # delivery and local work
    record            = aggregate(round, chosen, replies, failures)  # the server update
    record["errors"], record["seconds"]                  # who failed and why; how long
    fit.round, fit.history                               # the round is recorded, then
    on_record(record)                                    # (the core: convergence monitor)
    rule.check(fit.history, round, ...)                  # a client failing K rounds in a
                                                         # row stops the fit

What differs between the fits is what they pass, not a copy of the loop:

- the **engine** (:class:`~hbfl_pyro.engines.base.Engine`): the core's deliver each
  message to a client object (:class:`~hbfl_pyro.engines.InProcessEngine`,
  :class:`~hbfl_pyro.engines.VectorisedEngine`, a Flower grid) and may return only the
  replies' sum (:class:`~hbfl_pyro.engines.base.SecureSum`); the deep trainers'
  (:class:`~hbfl_pyro.engines.deep.DeepEngine`) train the round's clients in one vmapped
  pass and return their replies as rows of tensors, with the failing clients found and
  left out. Either way a client's failure comes back in ``failures``, not raised (an
  engine raises only when every client raised: a bug in the code, not a client's fault);
- **aggregate**: the core's server strategy checks the replies and ``min_clients`` and
  writes the record itself; the deep trainers write ``round``, ``clients`` and, when a
  client failed, ``failed`` and ``errors``, then update their server if enough clients
  replied;
- the :class:`~hbfl_pyro.failures.FailureRule`: the error's remedy, the number of
  rounds, ``on_client_failure="drop"``, and which rounds it judges (the core every round,
  the deep trainers those in which a client failed).

Checks before a round (differential privacy's budget) stay with the caller: a refused
round is not timed, selects nobody and is not recorded.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from .failures import FailureRule


class Fit(Protocol):
    """What the round loop reads and advances: the round counter and the history."""

    round: int
    history: List[Dict]


class RoundEngine(Protocol):
    """What delivers a round (:class:`~hbfl_pyro.engines.base.Engine`'s one method)."""

    def run_round(self, messages: Dict[Any, Any]) -> Tuple[Any, Dict[Any, str]]: ...


def federated_round(
    fit: Fit,
    select: Callable[[int], List[Any]],
    write: Callable[[int, List[Any]], Dict[Any, Any]],
    engine: RoundEngine,
    aggregate: Callable[[int, List[Any], Any, Dict[Any, str]], Dict],
    rule: FailureRule,
    on_record: Optional[Callable[[Dict], None]] = None,
) -> Dict:
    """Run round ``fit.round + 1`` (see the module docstring); returns its record, which
    is also appended to ``fit.history``.

    :param fit: the fit whose ``round`` and ``history`` the round advances.
    :param select: ``select(round)``, the round's clients.
    :param write: ``write(round, chosen)``, ``{client: message}`` for every chosen client.
    :param engine: delivers the messages: ``engine.run_round(messages)`` returns the
        replies and ``{client: reason}`` for the clients that sent none usable.
    :param aggregate: ``aggregate(round, chosen, replies, failures)``, the server update;
        returns the round's record (a record that names ``errors`` itself keeps them
        where it put them).
    :param rule: when failing clients stop the fit; checked once the round is recorded.
    :param on_record: called with the record once it is in the history (before the
        check), e.g. to add the stopping rule's status to it.
    :raises ~hbfl_pyro.ClientFailureError: when ``rule`` says so (the round is recorded).

    Example (a deep trainer's round, as :meth:`FederatedTrainer.step
    <hbfl_pyro.deep.FederatedTrainer.step>` runs it)::

        >>> import torch
        >>> from hbfl_pyro.deep import FedProx, LocalSpec, mlp
        >>> from hbfl_pyro.engines.deep import DeepEngine
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> clients = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
        >>> fit = FedProx(mlp((4, 5, 3)), clients, fraction=0.5, local=LocalSpec(epochs=1))
        >>> record = federated_round(
        ...     fit,
        ...     fit.select,
        ...     lambda server_round, chosen: dict.fromkeys(chosen),  # FedProx sends nothing
        ...     DeepEngine(fit),
        ...     lambda server_round, chosen, replies, failures: {
        ...         "round": server_round, "clients": chosen, **fit.aggregate(chosen, replies)
        ...     },
        ...     FailureRule(),
        ... )
        >>> record["round"], record["clients"], fit.round, fit.history == [record]
        (1, [2, 3], 1, True)
        >>> list(record)[-1]
        'seconds'
    """
    server_round = fit.round + 1
    start = time.perf_counter()
    chosen = select(server_round)
    messages = write(server_round, chosen)
    replies, failures = engine.run_round(messages)
    record = aggregate(server_round, chosen, replies, failures)
    if failures:  # each failing client with its reason, for the report and the log
        record.setdefault("errors", dict(failures))
    record["seconds"] = time.perf_counter() - start
    fit.round = server_round
    fit.history.append(record)
    if on_record is not None:
        on_record(record)
    rule.check(fit.history, server_round, failed=bool(failures))
    return record


__all__ = ["Fit", "RoundEngine", "federated_round"]
