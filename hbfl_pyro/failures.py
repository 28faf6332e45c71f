"""Clients that keep failing: found from a fit's history, then refused or reported.

A client whose replies keep failing (its data outside what the model can evaluate, a
crash in its code) would otherwise be left out of round after round, and the fit would
end "successfully" without its data. :func:`failing_clients` reads the history records'
``clients`` (good replies) and ``failed`` lists, so checkpoints need no extra state; the
fit raises :class:`ClientFailureError` naming them, unless the user opted in to dropping
them (``on_client_failure="drop"``), and then the verdict names them.

Example::

    >>> history = [
    ...     {"clients": ["a", "b"], "failed": ["c"]},
    ...     {"clients": ["a"], "failed": ["b", "c"]},
    ...     {"clients": ["a", "b"], "failed": ["c"]},
    ... ]
    >>> failing_clients(history)
    ['c']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

#: A client whose replies fail this many rounds in a row (rounds it took part in) stops
#: the fit, or is dropped with ``on_client_failure="drop"``.
MAX_FAILED_ROUNDS = 3


class ClientFailureError(RuntimeError):
    """Some clients kept failing: their data would be missing from the posterior."""


def failing_clients(
    history: Sequence[Dict], rounds_in_a_row: int = MAX_FAILED_ROUNDS, final: bool = False
) -> List[str]:
    """Clients whose last ``rounds_in_a_row`` rounds (among those they took part in) all
    failed; with ``final``, also every client that took part and never succeeded (the
    fit is over: their data are in no round)."""
    streak: Dict[str, int] = {}
    succeeded = set()
    for record in history:
        for name in record.get("clients", ()):
            streak[name] = 0
            succeeded.add(name)
        for name in record.get("failed", ()):
            streak[name] = streak.get(name, 0) + 1
    stuck = {name for name, count in streak.items() if count >= rounds_in_a_row}
    if final:
        stuck |= set(streak) - succeeded
    return sorted(stuck)


#: What :func:`failure_message` tells the user to do, by default (a federated SVI fit).
FIT_REMEDY = (
    "their data would be missing from the posterior. Check those clients' data against "
    "the model (the ClientFailureWarnings above give each error), or pass "
    "on_client_failure='drop' to fit without them (the verdict then names them)"
)


def failure_message(
    server_round: int,
    clients: Sequence,
    final: bool = False,
    rounds_in_a_row: int = MAX_FAILED_ROUNDS,
    remedy: Optional[str] = None,
) -> str:
    """Why the fit stopped, naming the clients and the ways on (``remedy``, by default
    :data:`FIT_REMEDY`; ``rounds_in_a_row`` as given to :func:`failing_clients`)."""
    what = (
        "took part and never sent a usable reply"
        if final
        else f"failed {rounds_in_a_row} rounds in a row"
    )
    return f"round {server_round}: client(s) {list(clients)} {what}; {remedy or FIT_REMEDY}"


@dataclass(frozen=True)
class FailureRule:
    """When clients that keep failing stop a fit: the round loop
    (:func:`~hbfl_pyro.rounds.federated_round`) calls :meth:`check` once each round is
    recorded, so the error comes with the round that made a client's streak, in the
    history.

    :ivar rounds_in_a_row: failed rounds in a row that stop the fit
        (:func:`failing_clients`).
    :ivar remedy: what the error tells the user to do (``None``: :data:`FIT_REMEDY`).
    :ivar drop: never stop (``on_client_failure="drop"``: the verdict names the clients).
    :ivar every_round: judge every round (the core's fits: a fit continued after the error
        stops again at its next round). ``False`` judges only rounds in which a client
        failed (the deep trainers': a run continued after the error goes on until a
        client fails again).

    Example::

        >>> history = [{"clients": ["a"], "failed": ["b"]}] * 2
        >>> FailureRule(rounds_in_a_row=3).check(history, server_round=2)  # not yet
        >>> try:
        ...     FailureRule(rounds_in_a_row=2, remedy="drop b").check(history, 2)
        ... except ClientFailureError as error:
        ...     print(error)
        round 2: client(s) ['b'] failed 2 rounds in a row; drop b
    """

    rounds_in_a_row: int = MAX_FAILED_ROUNDS
    remedy: Optional[str] = None
    drop: bool = False
    every_round: bool = True

    def check(self, history: Sequence[Dict], server_round: int, failed: bool = True) -> None:
        """Raise :class:`ClientFailureError` naming the clients of ``history`` that failed
        :attr:`rounds_in_a_row` rounds in a row (``failed``: whether a client failed in
        round ``server_round``, the last of ``history``)."""
        if self.drop or not (failed or self.every_round):
            return
        stuck = failing_clients(history, self.rounds_in_a_row)
        if stuck:
            raise ClientFailureError(
                failure_message(
                    server_round, stuck, rounds_in_a_row=self.rounds_in_a_row, remedy=self.remedy
                )
            )


__all__ = [
    "FIT_REMEDY",
    "MAX_FAILED_ROUNDS",
    "ClientFailureError",
    "FailureRule",
    "failing_clients",
    "failure_message",
]
