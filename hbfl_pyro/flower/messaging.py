"""Talking to the Flower nodes: what the plain and the SecAgg+ ServerApp both send.

:func:`send_and_receive` pushes messages and polls for their replies (fast: a
deployment's grid sleeps 3 s between pulls), :func:`error_text` reads a failed reply,
:func:`query_nodes` sends a ``query`` to every node, and :func:`discover_clients` waits
for the nodes and asks each for its client's name, partition and data schema.
:mod:`hbfl_pyro.flower.apps` and :mod:`hbfl_pyro.flower.secagg` both import these; neither
imports the other's internals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Dict, List, Tuple

from .records import decode

#: A child of Flower's logger: shown by ``flwr run --stream`` and ``flwr log``.
logger = logging.getLogger("flwr.hbfl_pyro")


def error_text(msg) -> str:
    """A Flower reply's error as one line: ``"CODE_NAME: reason"``."""
    from flwr.common.constant import ErrorCode

    names = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}
    code = msg.error.code
    return f"{names.get(code, code)}: {' '.join(str(msg.error.reason).split())}"


def send_and_receive(grid, messages: List, timeout: float, poll: float = 0.05) -> List:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` passes.

    As ``grid.send_and_receive``, but polling every ``poll`` seconds (a deployment's grid
    sleeps 3 s between pulls).
    """
    if not messages:
        return []
    pending = {i for i in grid.push_messages(messages) if i}
    replies: List = []
    end = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(poll)
    return replies


def wait_for_nodes(grid, wanted: int, timeout: float) -> List[int]:
    """The connected node ids once ``wanted`` are connected (``0``: once the count has been
    stable for a second); :class:`TimeoutError` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if wanted and len(nodes) >= wanted:
            return nodes
        if nodes != last:
            last, stable_since = nodes, time.monotonic()
        if not wanted and nodes and time.monotonic() - stable_since >= 1.0:
            return nodes
        if time.monotonic() >= end:
            raise TimeoutError(
                f"only {len(nodes)} Flower node(s) connected within {timeout:g} s "
                f"(num-clients={wanted}); start more SuperNodes or lower num-clients"
            )
        time.sleep(0.1)


def query_nodes(grid, node_ids: List[int], action: str, timeout: float, poll: float, **fields: str):
    """Send each node a ``query`` message with ``action`` (``"hello"``, ``"report"``) and
    any further ``fields``: ``({node: decoded answer}, {node: why it gave none})``."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    messages = {
        nid: Message(
            RecordDict({"hbfl.query": ConfigRecord({"action": action, **fields})}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in node_ids
    }
    replies = send_and_receive(grid, list(messages.values()), timeout, poll)
    node_of = {m.metadata.message_id: nid for nid, m in messages.items()}
    answers, errors = {}, {}
    for reply in replies:
        nid = node_of.get(reply.metadata.reply_to_message_id)
        if reply.has_error():
            errors[nid] = error_text(reply)
        else:
            answers[nid] = decode(reply.content)
    for nid in node_ids:
        if nid not in answers and nid not in errors:
            errors[nid] = "no reply within the timeout"
    return answers, errors


def discover_clients(grid, config: Mapping) -> Tuple[List[str], Dict[str, int], Dict]:
    """Ask every node for its client: ``(names in partition order, {name: node}, schemas)``."""
    node_ids = wait_for_nodes(grid, int(config["num-clients"]), float(config["wait-timeout"]))
    # A connected node answers "hello" only once its ClientApp has imported torch, Pyro and
    # the model file and loaded its partition: client set-up work, timed like a round
    # (wait-timeout, for nodes to connect, ran out on a loaded 2-core machine).
    answers, errors = query_nodes(
        grid, node_ids, "hello", float(config["round-timeout"]), float(config["poll-interval"])
    )
    if errors:
        detail = "; ".join(f"node {nid}: {why}" for nid, why in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} node(s) could not set up their client: {detail}")
    order = sorted(answers, key=lambda nid: (answers[nid]["partition-id"], answers[nid]["name"]))
    names = [answers[nid]["name"] for nid in order]
    if len(set(names)) != len(names):
        raise RuntimeError(
            f"two nodes hold the same client name ({names}); give each SuperNode its own "
            "partition-id"
        )
    nodes = {answers[nid]["name"]: nid for nid in order}
    schemas = {answers[nid]["name"]: answers[nid]["schema"] for nid in order}
    return names, nodes, schemas


__all__ = [
    "discover_clients",
    "error_text",
    "logger",
    "query_nodes",
    "send_and_receive",
    "wait_for_nodes",
]
