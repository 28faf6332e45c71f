"""The Flower ``ServerApp`` and ``ClientApp`` of a model file.

Both apps read the same *run config* (Flower's ``context.run_config``, overridden by the
``run_config`` given to the factory; keys in :data:`RUN_CONFIG_DEFAULTS`):

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

import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..server import ClientFailureWarning
from .records import decode, has_tree, num_bytes, record_dict
from .secagg import SECAGG_CONFIG_DEFAULTS, flag

# A child of Flower's logger: shown by `flwr run --stream` and `flwr log`.
logger = logging.getLogger("flwr.hbfl_pyro")

#: Run-config keys read by both apps, with their defaults.
RUN_CONFIG_DEFAULTS: Dict[str, Any] = {
    "model-file": "",
    "options": "{}",
    "rounds": -1,
    "guide": "",
    # Nodes to wait for before the first round (0: every node connected once the
    # count has been stable for a second).
    "num-clients": 0,
    "wait-timeout": 120.0,
    # Seconds a round waits for replies; a node that has not answered by then failed.
    "round-timeout": 600.0,
    "poll-interval": 0.05,
    # Where the ServerApp writes result.pt and history.json ("" : nowhere).
    "out-dir": "",
    # Clients send their local state at the end (for simulation summaries only): the
    # ServerApp asks, and a ClientApp answers only if its own config says so too.
    "collect-local": False,
    # Secure aggregation (closed-form server): see hbfl_pyro.flower.secagg.
    **SECAGG_CONFIG_DEFAULTS,
}
#: Keywords a node's client ignores: they belong to the server.
_CLIENT_SIDE = {"fraction": 1.0, "min_clients": 1, "engine": "inprocess", "on_message": None}
_SERVER_SIDE = {"engine": "inprocess", "on_message": None}


def _flower_server(options: Dict) -> Dict:
    """The options with ``server="auto"`` narrowed to the first-order servers: the
    second-order server does not run through these apps yet, and a node must build the
    same server as the ServerApp, whatever options only the ServerApp sees."""
    if options.get("server", "auto") == "auto":
        options["server"] = "first_order"
    return options


DEFAULT_ROUNDS = 100
#: Record prefix of the client's state in the Flower context.
STATE_PREFIX = "hbfl.client"


def _flwr():
    from . import require_flower

    return require_flower()


# ---------------------------------------------------------------------- configuration
@dataclass
class AppSpec:
    """The model file and options both apps derive from the run config."""

    config: Dict[str, Any]
    model_file: Any  # hbfl_pyro.modelfile.ModelFile
    options: Dict[str, Any]
    rounds: int


def merged_config(context_config: Optional[Mapping], overrides: Optional[Mapping]) -> Dict:
    """:data:`RUN_CONFIG_DEFAULTS`, then the context's run config, then ``overrides``."""
    config = dict(RUN_CONFIG_DEFAULTS)
    for source in (context_config or {}), (overrides or {}):
        config.update({k: v for k, v in dict(source).items()})
    return config


_MODEL_FILES: Dict[Tuple[str, float, Optional[str]], Any] = {}


def load_spec(config: Mapping) -> AppSpec:
    """Import the model file named by the run config (cached per process); float64."""
    from ..modelfile import load_model_file, parse_model_spec

    # As `hbfl fit`: before the model file is imported, so its constants are float64.
    torch.set_default_dtype(torch.float64)
    spec = str(config["model-file"])
    if not spec:
        raise ValueError(
            "the run config has no 'model-file': pass --run-config \"model-file='/abs/"
            "path/model.py'\" to flwr run, or run_config={'model-file': ...}"
        )
    path = parse_model_spec(spec)[0]
    guide = str(config.get("guide", "")) or None
    key = (spec, path.stat().st_mtime if path.exists() else 0.0, guide)
    if key not in _MODEL_FILES:
        _MODEL_FILES[key] = load_model_file(spec, guide=guide)
    mf = _MODEL_FILES[key]
    raw = config["options"]
    overrides = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if not isinstance(overrides, dict):
        raise ValueError(f"run config 'options' must be a JSON object, got {raw!r}")
    rounds = int(config["rounds"])
    if rounds < 0:
        rounds = mf.rounds if mf.rounds is not None else DEFAULT_ROUNDS
    # Decays the file states over the whole run are spread over the rounds run here.
    options = mf.options_for(rounds)
    options.update(overrides)
    return AppSpec(dict(config), mf, options, rounds)


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
        options = _flower_server(dict(spec.options))
        options.update(_CLIENT_SIDE)
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

    from .records import encode
    from .secagg import client_train, is_secagg_message

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
def _error_text(msg) -> str:
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
        self._outbox: Dict[int, Tuple[str, Any]] = {}

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
                errors[name] = _error_text(reply)
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


def _wait_for_nodes(grid, wanted: int, timeout: float) -> List[int]:
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


def _query(grid, node_ids: List[int], action: str, timeout: float, poll: float):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    messages = {
        nid: Message(
            RecordDict({"hbfl.query": ConfigRecord({"action": action})}),
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
            errors[nid] = _error_text(reply)
        else:
            answers[nid] = decode(reply.content)
    for nid in node_ids:
        if nid not in answers and nid not in errors:
            errors[nid] = "no reply within the timeout"
    return answers, errors


def discover_clients(grid, config: Mapping) -> Tuple[List[str], Dict[str, int], Dict]:
    """Ask every node for its client: ``(names in partition order, {name: node}, schemas)``."""
    node_ids = _wait_for_nodes(grid, int(config["num-clients"]), float(config["wait-timeout"]))
    # A connected node answers "hello" only once its ClientApp has imported torch, Pyro and
    # the model file and loaded its partition: client set-up work, timed like a round
    # (wait-timeout, for nodes to connect, ran out on a loaded 2-core machine).
    answers, errors = _query(
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


def build_server(spec: AppSpec, names: List[str], schemas: Dict[str, Dict]):
    """The server side of :class:`~hbfl_pyro.FederatedSVI` from the clients' schemas.

    Returns a ``FederatedSVI`` whose clients hold the schemas (ones), never trained: only
    its ``server``, ``structure`` and ``family`` are used.
    """
    from ..svi import FederatedSVI

    options = _flower_server(dict(spec.options))
    options.update(_SERVER_SIDE)
    return FederatedSVI(spec.model_file.model, {n: schemas[n] for n in names}, **options)


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
            _write_history(_result(spec, fit, names, nodes, strategy, setup), out)
        logger.info(
            "hbfl round %d: elbo %.6g, clients %s, failed %s",
            server_round,
            record["elbo"],
            record["clients"],
            record["failed"],
        )
    result = _result(spec, fit, names, nodes, strategy, setup)
    return finish_run(grid, spec, fit, nodes, result)


def finish_run(grid, spec: AppSpec, fit, nodes: Dict[str, int], result: Dict) -> Dict:
    """The end of a server run (plain or SecAgg+): collect the clients' local states when
    the run config asks (``collect-local``), summarise ``q(phi)``, write ``out-dir``."""
    config = spec.config
    if flag(config["collect-local"]):
        timeout, poll = float(config["round-timeout"]), float(config["poll-interval"])
        answers, errors = _query(grid, list(nodes.values()), "report", timeout, poll)
        for why in errors.values():
            logger.warning("hbfl: a client did not report its local state: %s", why)
        result["clients"] = {a["name"]: a["state"] for a in answers.values()}
    result["global"] = _global_summary(fit)
    out = str(config["out-dir"])
    if out:
        write_result(result, out)
    return result


def _result(spec, fit, names, nodes, strategy, setup) -> Dict:
    return {
        "round": len(strategy.history),
        "seed": fit.seed,
        "model_file": str(spec.config["model-file"]),
        "names": names,
        "nodes": nodes,
        "server": fit.server.state_dict(),
        "history": strategy.history,
        "traffic": strategy.traffic,
        "setup_seconds": setup,
        "clients": {},
        "global": {},
    }


def _global_summary(fit) -> Dict[str, Dict[str, float]]:
    """Mean and sd of each scalar global element, from 4000 seeded draws of ``q(phi)``."""
    from ..seeding import derive_seed, seeded

    with seeded(derive_seed(fit.seed, "flower-summary")), torch.no_grad():
        draws = fit.global_samples(4000)
    out = {}
    for site, value in draws.items():
        flat = value.reshape(value.shape[0], -1)
        for j in range(flat.shape[1]):
            key = site if flat.shape[1] == 1 else f"{site}[{j}]"
            out[key] = {"mean": float(flat[:, j].mean()), "sd": float(flat[:, j].std())}
    return out


def write_result(result: Dict, out_dir) -> Path:
    """Write ``result.pt`` (``torch.save``) and ``history.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / "result.pt")
    _write_history(result, out)
    return out / "result.pt"


def _write_history(result: Dict, out_dir) -> None:
    """``history.json``: rounds, failures, traffic and the global summary (no tensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("round", "seed", "model_file", "names", "nodes", "history", "traffic", "global")
    text = json.dumps({k: result[k] for k in keys}, indent=1, default=str)
    tmp = out / "history.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "history.json")


def server_app(run_config: Optional[Mapping] = None, on_result: Optional[Callable] = None):
    """A Flower ``ServerApp`` that fits the model file's model by federated SVI.

    :param run_config: run-config entries overriding the context's (see the module
        docstring and :data:`RUN_CONFIG_DEFAULTS`).
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
            from .secagg import run_secagg_server

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
