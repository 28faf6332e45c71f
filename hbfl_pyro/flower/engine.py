"""The Flower engine: a round's messages travel to Flower nodes and back.

:class:`FlowerEngine` is an :class:`~hbfl_pyro.engines.Engine` like the in-process ones,
so the ServerApp runs :class:`~hbfl_pyro.FederatedSVI`'s own round loop
(:meth:`~hbfl_pyro.FederatedSVI.run`: selection, aggregation, stopping rule, verdict, the
second-order server's PSIS rounds) and only the transport differs. Each message becomes a
Flower ``train`` message to the client's node (:mod:`hbfl_pyro.flower.records`), tagged
with the server strategy's mode so the node builds the matching client; replies are
decoded and returned in the order the messages were sent, so the server sums them as the
in-process engine does, bit for bit.

A node that fails (its ClientApp raises, it goes offline, or it does not answer within
the round timeout) is a failure of the round, with its reason, as a client that raises
in process is.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

from ..engines.base import Engine, Failures
from ..server import ClientFailureWarning
from .messaging import error_text, logger, send_and_receive
from .records import decode, num_bytes, record_dict

#: The record of a train message naming the server strategy's mode (read by the node).
#: In a resumed run it also holds ``resume-round`` (the round the run resumed after) and
#: ``last-round`` (the last round before it in which the client's update was aggregated),
#: so a node whose run has no state for its client yet loads it from its ``state-dir``.
SERVER_RECORD = "hbfl.server"


class ResumableRun:
    """What a Flower engine tells the nodes of a resumed run: the round it resumed after
    and, per client, the last round before it whose update the server aggregated (each
    node then loads its client's state of that round from its ``state-dir``). Shared by
    :class:`FlowerEngine` (in each train message's :data:`SERVER_RECORD`) and
    :class:`~hbfl_pyro.flower.secagg.SecAggEngine` (in each ``FitIns``)."""

    #: Set by :meth:`resume_after` in a resumed run.
    resume_round: Optional[int] = None
    last_rounds: Dict[str, int] = {}

    def resume_after(self, server_round: int, history: List[Dict]) -> None:
        """This run resumes after ``server_round``, whose ``history`` says which clients
        were aggregated in which round: every train message will tell its node so."""
        self.resume_round = int(server_round)
        self.last_rounds = {}
        for record in history:
            for name in record.get("clients", ()):
                self.last_rounds[str(name)] = int(record["round"])

    def resume_of(self, name: str) -> Optional[Tuple[int, int]]:
        """``(resume round, client's last aggregated round)`` in a resumed run, else ``None``."""
        if self.resume_round is None:
            return None
        return self.resume_round, self.last_rounds.get(name, 0)


class FlowerEngine(ResumableRun, Engine):
    """Runs a round's clients on Flower nodes through a ServerApp's ``grid``.

    :param grid: the ServerApp's Flower ``Grid``.
    :param nodes: ``{client name: Flower node id}``.
    :param mode: the server strategy's ``mode`` (``"closed_form"``, ``"gradient"``,
        ``"second_order"``), sent with every message.
    :param timeout: seconds a round waits for replies.
    :param poll: seconds between pulls for replies.

    :ivar traffic: per round, the payload bytes of each message sent (``bytes_down``)
        and of each reply received (``bytes_up``).
    """

    def __init__(self, grid, nodes: Dict[str, int], mode: str, timeout: float, poll: float):
        self.grid = grid
        self.nodes = dict(nodes)
        self.mode = mode
        self.timeout, self.poll = float(timeout), float(poll)
        self.traffic: List[Dict] = []

    def _train_message(self, name: str, message: Dict):
        from flwr.app import ConfigRecord, Message, MessageType

        content = record_dict(message)
        header: Dict[str, Any] = {"mode": self.mode}
        resume = self.resume_of(name)
        if resume is not None:
            header["resume-round"], header["last-round"] = resume
        content[SERVER_RECORD] = ConfigRecord(header)
        return Message(
            content,
            dst_node_id=self.nodes[name],
            message_type=MessageType.TRAIN,
            group_id=str(message["round"]),
        )

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], Failures]:
        sent = self.train_messages(messages)
        answers = send_and_receive(self.grid, [m for _, m in sent], self.timeout, self.poll)
        return self.collect(sent, answers)

    def train_messages(self, messages: Dict[str, Dict]) -> List[Tuple[str, Any]]:
        """``[(client name, Flower train message)]``, in the order of ``messages``."""
        return [(name, self._train_message(name, m)) for name, m in messages.items()]

    def collect(self, sent: List[Tuple[str, Any]], answers) -> Tuple[Dict[str, Dict], Failures]:
        """The replies to ``sent`` among ``answers`` (Flower messages), and the failures."""
        by_id = {msg.metadata.message_id: name for name, msg in sent}
        good: Dict[str, Dict] = {}
        errors: Failures = {}
        up = []
        for reply in answers:
            name = by_id.get(reply.metadata.reply_to_message_id)
            if name is None:
                continue
            if reply.has_error():
                errors[name] = error_text(reply)
                continue
            good[name] = decode(reply.content)
            up.append(num_bytes(reply.content))
        self.traffic.append(
            {
                "round": int(sent[0][1].metadata.group_id) if sent else None,
                "bytes_down": [num_bytes(msg.content) for _, msg in sent],
                "bytes_up": up,
            }
        )
        # In the order sent, whatever the order of arrival (see the module docstring).
        replies = {name: good[name] for name, _ in sent if name in good}
        failures = {
            name: errors.get(name, "no reply within the round timeout")
            for name, _ in sent
            if name not in good
        }
        for name, why in failures.items():
            node = self.nodes[name]
            logger.warning("hbfl: client %r (node %s) failed: %s", name, node, why)
            warnings.warn(
                f"client {name!r} (node {node}) failed: {why}; it is left out of this round",
                ClientFailureWarning,
                stacklevel=3,
            )
        if not replies and failures and all("RAISED_EXCEPTION" in w for w in failures.values()):
            # As in process: every client raising is a bug in the model or guide.
            name, why = next(iter(failures.items()))
            raise RuntimeError(
                f"every client failed this round (first: {name!r}: {why}); the server "
                "state is unchanged"
            )
        return replies, failures


__all__ = ["FlowerEngine", "ResumableRun", "SERVER_RECORD"]
