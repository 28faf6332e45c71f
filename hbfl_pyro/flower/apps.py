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
``checkpoint``, ``resume``, ``stop-after-round``, ``state-dir``
    the ServerApp writes its state to ``checkpoint`` after every round and continues
    from ``resume``; each node writes its client's state to its ``state-dir`` (node
    config, else run config) after every update and, in a resumed run, continues from it
    (:func:`~hbfl_pyro.flower.run.server_checkpoints`, :func:`load_node_state`).

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
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from .config import RUN_CONFIG_DEFAULTS, AppSpec, client_options, flag, load_spec, merged_config
from .engine import SERVER_RECORD, FlowerEngine
from .messaging import discover_clients, send_and_receive
from .records import decode, encode, has_tree, record_dict
from .run import build_server, run_with_engine, write_result
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
    """A node's client, built from the model file and its own data.

    The client is built as :class:`~hbfl_pyro.FederatedSVI` builds it (same seeds, same
    options less the server's) on the first ``train`` message, whose header names the
    server strategy's mode (:data:`~hbfl_pyro.flower.engine.SERVER_RECORD`): the
    ServerApp's choice, which may rest on options only it sees (e.g. ``fraction``). The
    client's state lives in the Flower context, not here.
    """

    def __init__(self, spec: AppSpec, node_config: Mapping):
        from ..data import FederatedData

        self.spec = spec
        self.name, data, self.partition = load_node_data(spec.model_file, node_config)
        per_client = spec.options.get("per_client", ())
        self.data = FederatedData({self.name: data}, per_client)
        self.schema = schema_of(self.data[0], self.data.per_client)
        self._clients: Dict[str, Tuple[Any, Dict]] = {}

    def client_for(self, mode: str):
        """The client for the server strategy ``mode``, and its initial state."""
        from ..svi import FederatedSVI

        if mode not in self._clients:
            options = client_options(self.spec, mode)
            fit = FederatedSVI(self.spec.model_file.model, self.data, **options)
            if fit.server.mode != mode:
                raise RuntimeError(
                    f"client {self.name!r}: the server runs the {mode} server but this node "
                    f"built a {fit.server.mode} client from the same options; give both "
                    "sides the same model file and options"
                )
            client = fit.clients[self.name]
            self._clients[mode] = (client, client.state_dict())
        return self._clients[mode]


_NODES: Dict[Tuple[int, int], NodeClient] = {}


# ---------------------------------------------------------------------- node-local state
def node_state_dir(spec: AppSpec, node_config: Mapping) -> Optional[Path]:
    """The node's ``state-dir`` (its node config's, else the run config's), or ``None``."""
    directory = str(dict(node_config).get("state-dir", "") or spec.config.get("state-dir", ""))
    return Path(directory) if directory else None


def _state_files(directory: Path, name: str) -> Tuple[Path, Path]:
    stem = quote(name, safe="")  # a client name is not always a file name
    return directory / f"{stem}.pt", directory / f"{stem}.previous.pt"


def save_node_state(
    directory: Path, name: str, mode: str, server_round: int, state, started=None
) -> None:
    """Write a client's state after its update in ``server_round`` to ``directory``
    (:func:`~hbfl_pyro.checkpoint.save_checkpoint`: atomic), keeping the one before too:
    a server stopped mid-round resumes after the round before, whose state is then the
    previous file.

    :param started: ``None`` if the update started from this run's state (the current
        file is the one before); else the first update of this run on this node, which
        started from ``started``: the saved ``{"round", "state"}`` it resumed, or ``{}``
        (its initial state; files of an older run are dropped).
    """
    directory.mkdir(parents=True, exist_ok=True)
    current, previous = _state_files(directory, name)
    fingerprint = {"client": name, "mode": mode}
    if started is None:
        if current.exists():
            os.replace(current, previous)
    elif started:
        save_checkpoint(started, previous, fingerprint)
    else:
        previous.unlink(missing_ok=True)
    save_checkpoint({"round": int(server_round), "state": state}, current, fingerprint)


def load_node_state(
    directory: Optional[Path], name: str, mode: str, resume_round: int, last_round: int
) -> Optional[Dict]:
    """A client's state as it was after round ``resume_round`` of the run resumed: its
    newest saved ``{"round", "state"}`` of that round or before; ``None`` (its initial
    state) if the server never aggregated its update (``last_round`` 0). Refused if
    older than ``last_round``, the last round the server aggregated its update in (the
    wrong or an old directory)."""
    if last_round <= 0:
        # Never aggregated before: its initial state (files there are of an older run).
        return None
    best: Optional[Dict] = None
    if directory is not None:
        for path in _state_files(directory, name):
            if path.exists():
                saved = load_checkpoint(path, {"client": name, "mode": mode})
                if saved["round"] <= resume_round and (
                    best is None or saved["round"] > best["round"]
                ):
                    best = saved
    have = best["round"] if best is not None else 0
    if have < last_round:
        where = f"state-dir {str(directory)!r}" if directory is not None else "no state-dir"
        raise RuntimeError(
            f"client {name!r}: the run resumes after round {resume_round}; the server "
            f"last aggregated this client's update in round {last_round}, but this "
            f"node's {where} holds "
            + (f"its state of round {have}" if best is not None else "no state of it")
            + "; give the node the state-dir of the run that wrote the checkpoint"
        )
    return best


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

    def load_state(context, node: NodeClient, mode: str, resume=None):
        """The client for ``mode`` with its state in this run, and where that came from:
        ``None`` from ``context.state``; else (the first update of this run on this node)
        the saved ``{"round", "state"}`` from the node's ``state-dir`` (a resumed run,
        ``resume = (resume round, last round)``), or ``{}``, its initial state."""
        client, initial_state = node.client_for(mode)
        if has_tree(context.state, STATE_PREFIX):
            client.load_state_dict(decode(context.state, STATE_PREFIX))
            return client, None
        saved = None
        if resume is not None:  # a resumed run: the state its last run left on this node
            directory = node_state_dir(node.spec, context.node_config)
            saved = load_node_state(directory, node.name, mode, *resume)
        # else a new run on this node: start from the initial local factor
        client.load_state_dict(initial_state if saved is None else saved["state"])
        return client, saved or {}

    def update(context, node: NodeClient, mode: str, message, finish=None, resume=None):
        """The local update; the state is stored only if ``finish(reply)`` returns."""
        client, started = load_state(context, node, mode, resume)
        reply = client.update(message)
        out = reply if finish is None else finish(reply)
        state = client.state_dict()
        for name, record in encode(state, STATE_PREFIX).items():
            context.state[name] = record
        directory = node_state_dir(node.spec, context.node_config)
        if directory is not None and "round" in message:
            round_ = int(message["round"])
            save_node_state(directory, node.name, mode, round_, state, started)
        return out

    @app.train()
    def train(msg, context):
        spec, node = _node_client(context, overrides)
        if is_secagg_message(msg):
            return client_train(
                msg,
                context,
                node.name,
                lambda m, finish, mode, resume: update(context, node, mode, m, finish, resume),
            )
        if flag(spec.config["secagg"]):
            raise PermissionError(
                f"client {node.name!r}: this node's run config sets secagg, but the server "
                "sent a plain train message; it answers only through SecAgg+"
            )
        header = msg.content[SERVER_RECORD]
        mode = str(header["mode"])
        resume = None
        if "resume-round" in header:  # a resumed run (see FlowerEngine.resume_after)
            resume = (int(header["resume-round"]), int(header["last-round"]))
        reply = update(context, node, mode, decode(msg.content), resume=resume)
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
            # The server's mode: a client sampled in no round has not heard it yet.
            fields = msg.content["hbfl.query"]
            resume = None
            if "resume-round" in fields:  # a resumed run: sampled in none of its rounds?
                last = json.loads(str(fields["last-rounds"])).get(node.name, 0)
                resume = (int(fields["resume-round"]), int(last))
            client, _ = load_state(context, node, str(fields["mode"]), resume)
            body = {"name": node.name, "state": client.state_dict()}
        else:
            raise ValueError(f"unknown query action {action!r}")
        return Message(record_dict(body), reply_to=msg)

    return app


# ---------------------------------------------------------------------- server side
class HBFLStrategy:
    """Deprecated (one release): the ServerApp now runs :meth:`hbfl_pyro.FederatedSVI.run`
    through a :class:`~hbfl_pyro.flower.engine.FlowerEngine`. This keeps the old two-step
    use, on top of that engine: :meth:`configure_train` returns a round's Flower messages,
    :meth:`aggregate_train` updates ``server`` from their replies.

    :param server: the server strategy (:class:`~hbfl_pyro.Server`, ...).
    :param nodes: ``{client name: Flower node id}``.
    """

    def __init__(self, server, nodes: Dict[str, int]):
        warnings.warn(
            "HBFLStrategy is deprecated: run FederatedSVI.run() with "
            "hbfl_pyro.flower.engine.FlowerEngine as its engine (what run_server does)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.server = server
        self.engine = FlowerEngine(None, nodes, server.mode, timeout=0.0, poll=0.0)
        self.history: List[Dict] = []
        self._sent: Dict[int, List] = {}

    @property
    def traffic(self) -> List[Dict]:
        return self.engine.traffic

    def configure_train(self, server_round: int, grid=None) -> List:
        """The round's ``train`` messages, one per sampled client."""
        messages = {
            name: self.server.message(server_round, name)
            for name in self.server.select(server_round)
        }
        self._sent[server_round] = self.engine.train_messages(messages)
        return [msg for _, msg in self._sent[server_round]]

    def aggregate_train(self, server_round: int, replies) -> Dict:
        """Update the server from the round's replies; returns the round's record."""
        good, failures = self.engine.collect(self._sent.pop(server_round, []), replies)
        record = self.server.aggregate(server_round, good, list(failures))
        record["errors"] = dict(failures)
        return record


def run_server(grid, config: Mapping) -> Dict:
    """The ServerApp's work: :class:`~hbfl_pyro.FederatedSVI`'s own rounds through a
    :class:`~hbfl_pyro.flower.engine.FlowerEngine` (:func:`~hbfl_pyro.flower.run.run_with_engine`);
    whatever server the options choose (closed-form, gradient or second-order) runs as in
    process: the same selection, aggregation, stopping rule and verdict."""

    def flower_engine(fit, nodes: Dict[str, int], cfg: Dict) -> FlowerEngine:
        timeout, poll = float(cfg["round-timeout"]), float(cfg["poll-interval"])
        return FlowerEngine(grid, nodes, fit.server.mode, timeout, poll)

    return run_with_engine(grid, config, flower_engine)


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
    "FlowerEngine",
    "HBFLStrategy",
    "NodeClient",
    "RUN_CONFIG_DEFAULTS",
    "build_server",
    "client_app",
    "discover_clients",
    "load_node_data",
    "load_node_state",
    "node_state_dir",
    "save_node_state",
    "load_spec",
    "merged_config",
    "run_server",
    "schema_of",
    "send_and_receive",
    "server_app",
    "write_result",
]
