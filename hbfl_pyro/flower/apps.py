"""The Flower ``ServerApp`` and ``ClientApp`` of a model file.

Both apps read the same *run config* (Flower's ``context.run_config``, overridden by the
``run_config`` given to the factory; keys in :data:`~hbfl_pyro.flower.config.RUN_CONFIG_DEFAULTS`):

``model-file``
    ``FILE[:NAME]`` of a model file (:mod:`hbfl_pyro.modelfile`); an absolute path in a
    deployment, since the apps run in other processes, possibly on other machines.
``options``
    a JSON object of :class:`~hbfl_pyro.FederatedSVI` keywords overriding the file's
    (``{"seed": 1, "local_steps": 5}``); both sides must be given the same.
``rounds``
    federated rounds (-1: the file's ``fit_options["rounds"]``, else 100).
``guide``
    a guide family's name (``"structured"``, ``"full-rank"``, ...; see
    :func:`~hbfl_pyro.guides.build.guide_family`) with the file's ``guide_options`` for it;
    ``""`` keeps the file's own guides.
``secagg``
    route the clients' closed-form summaries through Flower's SecAgg+ protocol, so the
    server sees only their sum (:mod:`hbfl_pyro.flower.secagg`; keys ``secagg-*``).

A round is the in-process round, message for message: the server samples clients with
:meth:`~hbfl_pyro.Server.select`, sends each a ``train`` message holding
:meth:`~hbfl_pyro.Server.message` (:mod:`hbfl_pyro.flower.records`), each node runs
:meth:`~hbfl_pyro.Client.update` on its own data and replies, and
:meth:`~hbfl_pyro.Server.aggregate` updates ``q(phi)``. A node that fails (its ClientApp
raises, it goes offline, or it does not answer within ``round-timeout``) is left out of
the round with a :class:`~hbfl_pyro.ClientFailureWarning`; the server updates if at least
``min_clients`` answered.

Before the first round the server sends a ``query`` to every node: each answers with its
client's name, its ``partition-id`` and its data *schema* (keys, dtypes and trailing
shapes, as tensors of ones -- no values), from which the server builds its side exactly
as :class:`~hbfl_pyro.FederatedSVI` does (the same seeds, the same client order). It
waits ``wait-timeout`` for the nodes to connect and ``round-timeout`` for their answers.

**Client data** come from the node: the model file's ``load_client(node_config)``
returning ``(name, {key: array})`` if it defines one, else its ``load_data()`` indexed by
the node's ``partition-id`` (``flower-supernode --node-config "partition-id=0"``; the
simulation engine numbers its nodes ``0..N-1``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..server import ClientFailureWarning
from .config import RUN_CONFIG_DEFAULTS, AppSpec, client_options, flag, load_spec, merged_config
from .messaging import discover_clients, error_text, logger, send_and_receive
from .records import decode, encode, has_tree, num_bytes, record_dict
from .run import build_server, finish_run, run_result, write_history, write_result
from .secagg import client_train, is_secagg_message, run_secagg_server

#: Record prefix of the client's state in the Flower context.
STATE_PREFIX = "hbfl.client"


def _flwr():
    from . import require_flower

    return require_flower()


# ---------------------------------------------------------------------- client side
def load_node_data(model_file, node_config: Mapping) -> Tuple[str, Dict, int]:
    """This node's ``(client name, data, partition id)`` (see the module docstring)."""
    from ..data import FederatedData

    node_config = dict(node_config)
    pid = int(node_config.get("partition-id", -1))
    loader = getattr(model_file.module, "load_client", None)
    if loader is not None:
        name, data = loader(node_config)
        return str(name), data, pid
    if pid < 0:
        raise ValueError(
            f"{model_file.path}: the node has no 'partition-id' in its node config; start "
            'the SuperNode with --node-config "partition-id=0" or define '
            "load_client(node_config) -> (name, data) in the model file"
        )
    data = FederatedData(model_file.load_data(), model_file.options.get("per_client", ()))
    if pid >= len(data):
        raise ValueError(
            f"{model_file.path}: partition-id {pid} but load_data() has {len(data)} clients"
        )
    return data.names[pid], data[pid], pid


def schema_of(data: Mapping[str, torch.Tensor], per_client=()) -> Dict[str, torch.Tensor]:
    """One client's data schema as tensors of ones: per-observation keys with one row.

    This is what :meth:`hbfl_pyro.FederatedData.placeholder` is built from: keys, dtypes
    and shapes, and no value of the client's.
    """
    per_client = set(per_client)
    return {
        k: torch.ones(
            (1,) + tuple(t.shape[1:]) if t.dim() > 0 and k not in per_client else t.shape,
            dtype=t.dtype,
        )
        for k, t in data.items()
    }


class NodeClient:
    """A node's :class:`~hbfl_pyro.Client`, built from the model file and its own data.

    The client is built as :class:`~hbfl_pyro.FederatedSVI` builds it (same seeds, same
    options less the server's); its state lives in the Flower context, not here.
    """

    def __init__(self, spec: AppSpec, node_config: Mapping):
        from ..svi import FederatedSVI

        self.name, data, self.partition = load_node_data(spec.model_file, node_config)
        options = client_options(spec)
        fit = FederatedSVI(spec.model_file.model, {self.name: data}, **options)
        self.client = fit.clients[self.name]
        self.schema = schema_of(self.client.data, fit.data.per_client)
        self.initial_state = self.client.state_dict()


_NODES: Dict[Tuple[int, int], NodeClient] = {}


def _node_client(context, overrides) -> Tuple[AppSpec, NodeClient]:
    config = merged_config(context.run_config, overrides)
    spec = load_spec(config)
    key = (int(context.run_id), int(context.node_id))
    if key not in _NODES:
        _NODES[key] = NodeClient(spec, context.node_config)
    return spec, _NODES[key]


def client_app(run_config: Optional[Mapping] = None):
    """A Flower ``ClientApp`` running the library's client update on the node's data.

    :param run_config: run-config entries overriding the context's (the simulation engine
        gives none), e.g. ``{"model-file": "/abs/models/normal_normal.py"}``.

    ``train`` messages run :meth:`hbfl_pyro.Client.update`; the client's state
    (:meth:`hbfl_pyro.Client.state_dict`: local guide parameters, optimiser state, update
    count) is loaded from ``context.state`` before and stored there after. ``query``
    messages answer ``hello`` (name, partition id, data schema) and, only when this
    node's run config sets ``collect-local``, ``report`` (the local state).
    """
    _flwr()
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    overrides = dict(run_config or {})
    app = ClientApp()

    def load_state(context, node: NodeClient) -> None:
        if has_tree(context.state, STATE_PREFIX):
            node.client.load_state_dict(decode(context.state, STATE_PREFIX))
        else:  # a new run on this node: start from the initial local factor
            node.client.load_state_dict(node.initial_state)

    def update(context, node: NodeClient, message, finish=None):
        """The local update; the state is stored only if ``finish(reply)`` returns."""
        load_state(context, node)
        reply = node.client.update(message)
        out = reply if finish is None else finish(reply)
        for name, record in encode(node.client.state_dict(), STATE_PREFIX).items():
            context.state[name] = record
        return out

    @app.train()
    def train(msg, context):
        spec, node = _node_client(context, overrides)
        if is_secagg_message(msg):
            return client_train(
                msg, context, node.name, lambda m, finish: update(context, node, m, finish)
            )
        if flag(spec.config["secagg"]):
            raise PermissionError(
                f"client {node.name!r}: this node's run config sets secagg, but the server "
                "sent a plain train message; it answers only through SecAgg+"
            )
        reply = update(context, node, decode(msg.content))
        return Message(record_dict(reply), reply_to=msg)

    @app.query()
    def query(msg, context):
        spec, node = _node_client(context, overrides)
        action = str(msg.content["hbfl.query"]["action"])
        if action == "hello":
            body = {"name": node.name, "partition-id": node.partition, "schema": node.schema}
        elif action == "report":
            if not spec.config["collect-local"]:
                raise PermissionError(
                    f"client {node.name!r}: the server asked for the local state, but this "
                    "node's run config does not set collect-local"
                )
            load_state(context, node)
            body = {"name": node.name, "state": node.client.state_dict()}
        else:
            raise ValueError(f"unknown query action {action!r}")
        return Message(record_dict(body), reply_to=msg)

    return app


# ---------------------------------------------------------------------- server side
class HBFLStrategy:
    """The Flower strategy of federated SVI: the library's :class:`~hbfl_pyro.Server`.

    Its two methods have the roles (and names) of a Flower strategy's:
    :meth:`configure_train` builds a round's ``train`` messages (the clients of
    :meth:`~hbfl_pyro.Server.select`, each with :meth:`~hbfl_pyro.Server.message`), and
    :meth:`aggregate_train` updates the server from the replies
    (:meth:`~hbfl_pyro.Server.aggregate`).

    :param server: the :class:`~hbfl_pyro.Server`.
    :param nodes: ``{client name: Flower node id}``.
    """

    def __init__(self, server, nodes: Dict[str, int]):
        self.server = server
        self.nodes = dict(nodes)
        self.history: List[Dict] = []
        self.traffic: List[Dict] = []
        self._outbox: Dict[int, List[Tuple[str, Any]]] = {}

    def configure_train(self, server_round: int, grid=None) -> List:
        """The round's ``train`` messages, one per sampled client."""
        from flwr.app import Message, MessageType

        messages = []
        self._outbox[server_round] = []
        for name in self.server.select(server_round):
            content = record_dict(self.server.message(server_round, name))
            msg = Message(
                content,
                dst_node_id=self.nodes[name],
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            self._outbox[server_round].append((name, msg))
            messages.append(msg)
        return messages

    def aggregate_train(self, server_round: int, replies) -> Dict:
        """Update the server from the round's replies; returns the round's record.

        Replies carrying an error, and clients with no reply, are the round's failures.
        """
        sent = self._outbox.pop(server_round, [])
        by_id = {msg.metadata.message_id: name for name, msg in sent}
        good, errors = {}, {}
        down = [num_bytes(msg.content) for _, msg in sent]
        up = []
        for reply in replies:
            name = by_id.get(reply.metadata.reply_to_message_id)
            if name is None:
                continue
            if reply.has_error():
                errors[name] = error_text(reply)
                continue
            good[name] = decode(reply.content)
            up.append(num_bytes(reply.content))
        for name, _ in sent:
            if name not in good and name not in errors:
                errors[name] = "no reply within the round timeout"
        # Replies arrive in any order; the server sums them in the order they were sent,
        # as the in-process engine does, so that floating-point sums agree bit for bit.
        good = {name: good[name] for name, _ in sent if name in good}
        for name, why in sorted(errors.items()):
            logger.warning(
                "hbfl round %d: client %r (node %s) failed: %s",
                server_round,
                name,
                self.nodes[name],
                why,
            )
            warnings.warn(
                f"round {server_round}: client {name!r} (node {self.nodes[name]}) failed: "
                f"{why}; it is left out of this round",
                ClientFailureWarning,
                stacklevel=2,
            )
        if not good and errors and all("RAISED_EXCEPTION" in w for w in errors.values()):
            # As in process: every client raising is a bug in the model or guide.
            first = next(iter(sorted(errors.items())))
            raise RuntimeError(
                f"every client failed round {server_round} (first: {first[0]!r}: {first[1]}); "
                "the server state is unchanged"
            )
        record = self.server.aggregate(server_round, good, sorted(errors))
        record["errors"] = dict(sorted(errors.items()))
        self.traffic.append(
            {
                "round": server_round,
                "bytes_down": down,
                "bytes_up": up,
            }
        )
        return record


def run_server(grid, config: Mapping) -> Dict:
    """The ServerApp's work: discover the clients, run the rounds, collect the result."""
    spec = load_spec(config)
    start = time.perf_counter()
    names, nodes, schemas = discover_clients(grid, spec.config)
    fit = build_server(spec, names, schemas)
    strategy = HBFLStrategy(fit.server, nodes)
    timeout, poll = float(spec.config["round-timeout"]), float(spec.config["poll-interval"])
    out = str(spec.config["out-dir"])
    logger.info("hbfl: %d clients on nodes %s; %d rounds", len(names), nodes, spec.rounds)
    setup = time.perf_counter() - start
    for server_round in range(1, spec.rounds + 1):
        t0 = time.perf_counter()
        messages = strategy.configure_train(server_round, grid)
        replies = send_and_receive(grid, messages, timeout, poll)
        record = strategy.aggregate_train(server_round, replies)
        record["seconds"] = time.perf_counter() - t0
        strategy.history.append(record)
        if out:  # progress, for whoever watches a deployment
            write_history(run_result(spec, fit, names, nodes, strategy, setup), out)
        logger.info(
            "hbfl round %d: elbo %.6g, clients %s, failed %s",
            server_round,
            record["elbo"],
            record["clients"],
            record["failed"],
        )
    result = run_result(spec, fit, names, nodes, strategy, setup)
    return finish_run(grid, spec, fit, nodes, result)


def server_app(run_config: Optional[Mapping] = None, on_result: Optional[Callable] = None):
    """A Flower ``ServerApp`` that fits the model file's model by federated SVI.

    :param run_config: run-config entries overriding the context's (see the module
        docstring and :data:`~hbfl_pyro.flower.config.RUN_CONFIG_DEFAULTS`).
    :param on_result: called with the result dict when the run ends (the simulation
        engine runs the ServerApp in this process); a deployment sets ``out-dir``.

    The result holds ``server`` (:meth:`hbfl_pyro.Server.state_dict`), ``history`` (one
    record a round, as :attr:`hbfl_pyro.FederatedSVI.history`, plus each failure's reason
    under ``errors``), ``traffic`` (payload bytes of each message, down and up),
    ``names``/``nodes`` and, with ``collect-local``, ``clients`` (their local states).
    """
    _flwr()
    from flwr.serverapp import ServerApp

    overrides = dict(run_config or {})
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        config = merged_config(context.run_config, overrides)
        if flag(config["secagg"]):
            result = run_secagg_server(grid, config, context)
        else:
            result = run_server(grid, config)
        if on_result is not None:
            on_result(result)

    return app


__all__ = [
    "AppSpec",
    "HBFLStrategy",
    "NodeClient",
    "RUN_CONFIG_DEFAULTS",
    "build_server",
    "client_app",
    "discover_clients",
    "load_node_data",
    "load_spec",
    "merged_config",
    "run_server",
    "schema_of",
    "send_and_receive",
    "server_app",
    "write_result",
]
