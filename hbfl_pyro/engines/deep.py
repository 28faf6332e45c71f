"""The deep trainers' engine: a round's local training, batched, with the core's failure
handling.

The deep trainers (:class:`~hbfl_pyro.deep.FederatedTrainer` and its methods) run their
rounds through the package's one round loop (:func:`~hbfl_pyro.rounds.federated_round`)
with a :class:`DeepEngine`: it delivers the round's messages through the trainer's hooks,
runs the trainer's :meth:`~hbfl_pyro.deep.FederatedTrainer.local_updates` for all the
chosen clients at once (vmapped, or one after another, as the trainer's ``engine`` says),
and returns ``(replies, failures)`` as every engine does. What is the deep trainers' own:
the replies are one row per client of a tensor (or of each tensor of a tuple, e.g. the
mixture's ``(thetas, responsibilities)``), not a dict per client, and the engine, not the
server, leaves out the rows that hold NaN or Inf.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from ..server import ClientFailureWarning
from .base import Engine

if TYPE_CHECKING:  # (hbfl_pyro.deep imports this module)
    from ..deep.fedhb import FederatedTrainer


def reply_parts(replies) -> Tuple:
    """A round's replies as a tuple of per-client parts (tensors with one row per client,
    or ``None``): a tensor alone or a tuple of them (e.g. the mixture's ``(thetas, resp)``)."""
    return replies if isinstance(replies, tuple) else (replies,)


def _finite_rows(replies) -> Optional[torch.Tensor]:
    """Which clients' replies hold only finite numbers, ``(C,)`` bool (``None``: no
    floating-point part to check)."""
    ok = None
    for part in reply_parts(replies):
        if isinstance(part, torch.Tensor) and part.is_floating_point():
            rows = torch.isfinite(part.reshape(part.shape[0], -1)).all(-1)
            ok = rows if ok is None else ok & rows
    return ok


def _take_rows(replies, positions: List[int]):
    """The replies of the clients at ``positions`` (same layout as ``replies``)."""
    parts = []
    for part in reply_parts(replies):
        if isinstance(part, torch.Tensor):
            part = part[torch.tensor(positions, dtype=torch.long, device=part.device)]
        parts.append(part)
    return tuple(parts) if isinstance(replies, tuple) else parts[0]


def join_rows(replies: List[Any]):
    """Per-client replies (each of one client, same layout) joined into one round's."""
    first = replies[0]
    columns = zip(*map(reply_parts, replies))
    parts = [None if col[0] is None else torch.cat(list(col)) for col in columns]
    return tuple(parts) if isinstance(first, tuple) else parts[0]


def failure_reason(exc: BaseException) -> str:
    """A failure's reason as the core's engines record it."""
    return f"{type(exc).__name__}: {exc}"


def screen_replies(
    trainer: FederatedTrainer,
    server_round: int,
    answered: List[int],
    replies,
    failures: Dict[int, str],
    stacklevel: int = 2,
) -> Tuple[Any, Dict[int, str]]:
    """What every deep engine does with a round's replies once they are in (in process,
    :meth:`DeepEngine.guard`; on Flower nodes,
    :class:`~hbfl_pyro.flower.deep.DeepFlowerEngine`): each reply goes through the
    trainer's hooks as sent (``"up"``, NaN included), the rows holding NaN or Inf are left
    out and added to ``failures``, and each failure is warned about with a
    :class:`~hbfl_pyro.ClientFailureWarning` (``stacklevel`` as :func:`warnings.warn`'s,
    from the caller of this function). Returns ``(replies, failures)``.

    :param answered: the clients whose rows ``replies`` holds, in order.
    :param replies: their rows (a tensor, or a tuple of them; ``None`` when none answered).
    :param failures: ``{client: reason}`` of the clients that sent no reply (updated).
    """
    if trainer.hooks:  # every reply as sent, before the server's check (as the core's)
        for j, i in enumerate(answered):
            row = tuple(p[j] if isinstance(p, torch.Tensor) else None for p in reply_parts(replies))
            trainer.deliver("up", i, trainer.reply_message(server_round, i, row))
    finite = _finite_rows(replies)
    if finite is not None and not bool(finite.all()):
        keep = []
        for j, (i, ok) in enumerate(zip(answered, finite.tolist())):
            if ok:
                keep.append(j)
            else:
                failures[i] = "its local training returned NaN or Inf weights"
        replies = _take_rows(replies, keep)
    for i in sorted(failures):
        warnings.warn(
            f"round {server_round}: client {i} failed ({failures[i]}); it is left out of "
            "this round",
            ClientFailureWarning,
            stacklevel=stacklevel + 1,
        )
    return replies, failures


class DeepEngine(Engine):
    """Runs a deep trainer's round: messages down, batched local training, replies up.

    :param trainer: the :class:`~hbfl_pyro.deep.FederatedTrainer` whose clients train
        (its :meth:`~hbfl_pyro.deep.FederatedTrainer.local_updates`, message hooks and
        :attr:`~hbfl_pyro.deep.FederatedTrainer.PER_CLIENT`).

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import FedProx, LocalSpec, mlp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> clients = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
        >>> clients[1][0][0, 0] = float("nan")  # client 1's training diverges
        >>> fit = FedProx(mlp((4, 5, 3)), clients, local=LocalSpec(epochs=1))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # the ClientFailureWarning of client 1
        ...     replies, failures = DeepEngine(fit).run_round(dict.fromkeys([0, 1, 2]))
        >>> tuple(replies.shape) == (2, fit.net.d), failures
        (True, {1: 'its local training returned NaN or Inf weights'})
    """

    def __init__(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer
        #: The round in progress and its messages, ``(round, {client: message})``: what
        #: the clients read while they train (each message holds a copy of ``q(phi)``,
        #: so they are not kept after the round).
        self.sent: Tuple[int, Dict] = (0, {})

    def run_round(self, messages: Dict) -> Tuple[Any, Dict]:
        """Send ``{client: message}`` (``None``: the method sends that client nothing, its
        local training reads the trainer) and train every client of ``messages``; returns
        the good clients' replies (rows, in the order of ``messages``) and ``{client:
        reason}`` for the others, sorted by client.

        The round is the trainer's next (``trainer.round + 1``: the round loop advances
        the counter once the round is recorded). Every message goes through the hooks
        before any client trains (``"down"``), then each reply as sent (``"up"``; see
        :class:`~hbfl_pyro.deep.FederatedTrainer`)."""
        trainer = self.trainer
        server_round = trainer.round + 1
        sent = {client: message for client, message in messages.items() if message is not None}
        for client, message in sent.items():
            trainer.deliver("down", client, message)
        self.sent = (server_round, sent)
        try:
            # (warnings: stacklevel 4 from here is the caller of the trainer's step, as
            # run_round <- federated_round <- step <- caller)
            replies, failures = self.guard(server_round, list(messages), stacklevel=4)
        finally:
            self.sent = (0, {})
        return replies, {client: failures[client] for client in sorted(failures)}

    def guard(
        self, server_round: int, chosen: List[int], stacklevel: int = 2
    ) -> Tuple[Any, Dict[int, str]]:
        """The trainer's :meth:`~hbfl_pyro.deep.FederatedTrainer.local_updates` of
        ``chosen`` with the core's failure handling: returns the good clients' replies
        (those of ``chosen`` not failed, in order) and ``{client: reason}`` for the failed
        ones, each warned about with a :class:`~hbfl_pyro.ClientFailureWarning`
        (``stacklevel`` as :func:`warnings.warn`'s, from the caller of this method).
        Replies are untouched when none failed.

        When the batched training raises, each chosen client trains alone to find the
        culprit(s); if every one raises, the error is the code's, not a client's, and is
        raised. The hooks see each reply that training returned (NaN included: the check
        comes after, as in the core). A trainer whose replies are not per client
        (``PER_CLIENT = False``, e.g. :class:`~hbfl_pyro.deep.Pooled`) runs unguarded."""
        trainer = self.trainer
        if not trainer.PER_CLIENT:
            return trainer.local_updates(server_round, chosen), {}
        failures: Dict[int, str] = {}
        try:
            replies = trainer.local_updates(server_round, chosen)
            answered = list(chosen)
        except Exception as batch_error:
            # Charge the failure to its client(s): each chosen client trains alone.
            parts, answered, first = [], [], None
            for i in chosen:
                try:
                    parts.append(trainer.local_updates(server_round, [i]))
                except Exception as exc:
                    first = first or exc
                    failures[i] = failure_reason(exc)
                else:
                    answered.append(i)
            if not parts:  # every client raised: a bug in the code, not a client's fault
                raise (first or batch_error) from None
            replies = join_rows(parts)
        return screen_replies(trainer, server_round, answered, replies, failures, stacklevel + 1)


__all__ = ["DeepEngine", "failure_reason", "join_rows", "reply_parts", "screen_replies"]
