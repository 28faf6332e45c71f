"""Deep trainers on Flower: a deep FedHB run with its clients on Flower nodes.

The deep trainers run their rounds through the package's one round loop
(:func:`~hbfl_pyro.rounds.federated_round`) with an engine doing the clients' local work
(:class:`~hbfl_pyro.engines.deep.DeepEngine` in process). Here the engine is
:class:`DeepFlowerEngine`: the ServerApp's trainer keeps its own ``step`` (selection, the
server strategy's messages, aggregation, the failure rule); only the transport differs.
Each message goes to the client's node as a Flower ``train`` message
(:mod:`hbfl_pyro.flower.records`); the node's ClientApp trains its one client with the
same local solver from the message alone (:func:`train_client`), and replies with the deep
reply message (:meth:`~hbfl_pyro.deep.FederatedTrainer.reply_message`: ``client``,
``round``, ``num_examples``, ``m``). The engine joins the replies into rows in the order
the messages were sent and screens them as in process
(:func:`~hbfl_pyro.engines.deep.screen_replies`: the ``"up"`` hooks, NaN or Inf rows left
out, a :class:`~hbfl_pyro.ClientFailureWarning` per failed client).

**The trainer file.** Neither app holds model code: both build the trainer from a
*trainer file*, ``FILE[:NAME]`` (run-config key ``trainer``), a Python file whose
function ``NAME`` (default ``make_trainer``) returns the trainer, called with the JSON
object ``trainer-options`` as keywords. It must build the same trainer in every process
(the same network initialisation, clients, seed and settings), whatever the process's
defaults: a SuperNode's or ServerApp's process starts with torch's float32 default
dtype and its own RNG state, so seed and type the initial network explicitly. The
ServerApp uses its server strategy (whose initial ``q(phi)`` holds the initial weights),
node ``i`` (``partition-id`` ``i``) trains client ``i``.

**Which trainers.** :class:`~hbfl_pyro.deep.FedHB` (so FedAvg and FedProx as its
families: :class:`~hbfl_pyro.deep.FedProx`, FedHB with a FedProx family, or the NIW
limits :func:`~hbfl_pyro.deep.fedavg_family`, :func:`~hbfl_pyro.deep.fedprox_family`)
with ``start="global"``: its clients train from their message alone. Methods whose
clients keep state between rounds on the trainer (``start="own"``, the mixture's labels,
the personalised baselines) or read the trainer instead of a message (the pooled
reference) are refused (:func:`check_trainer`).

**Equality with the in-process run.** A node trains its client alone. With the trainer's
``engine="inprocess"`` (the clients one after another in process too) every client's
arithmetic is the same, the records carry float64 bit for bit and the server sums the
rows in the order sent, so the run equals the in-process one bit for bit. With
``engine="vectorised"`` the in-process round trains the clients in one vmapped batch,
whose reductions may round differently from a batch of one: equal to round-off (1e-12
relative in the tests).

**Differential privacy.** ``FedHB(..., dp=DPConfig(...))``: each node clips its
client's update about the ``m0`` it was sent (the trainer's local solver does), the
ServerApp's server clips again and adds the noise; with ``reproducible_noise=True`` the
private run equals the in-process one bit for bit.

**Failures.** A client whose local training raises replies with the reason (the reason
in process, ``"RuntimeError: ..."``); a node that fails otherwise (its ClientApp raises,
it goes offline, it does not answer within ``round-timeout``) is a failure with Flower's
reason. Either way the client is left out of the round, as in process; when every client
raised the engine raises (a bug in the code, not a client's fault).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..engines.base import Engine
from ..engines.deep import failure_reason, join_rows, reply_parts, screen_replies
from .messaging import discover_clients, error_text, logger, send_and_receive
from .records import decode, num_bytes, record_dict
from .simulation import run_apps

#: Run-config keys of a deep run, with their defaults.
DEEP_CONFIG_DEFAULTS: Dict[str, Any] = {
    # FILE[:NAME] of the trainer file (an absolute path in a deployment).
    "trainer": "",
    # A JSON object of keywords for the trainer file's function.
    "trainer-options": "{}",
    "rounds": 1,
    # Nodes to wait for (0: every node connected once the count is stable for a second).
    "num-clients": 0,
    "wait-timeout": 120.0,
    # Seconds a round waits for replies; a node that has not answered by then failed.
    "round-timeout": 600.0,
    "poll-interval": 0.05,
    # Where the ServerApp writes result.pt ("": nowhere).
    "out-dir": "",
}

#: The trainer file's function when ``trainer`` names none.
DEFAULT_FACTORY = "make_trainer"


def _flwr():
    from . import require_flower

    return require_flower()


# ---------------------------------------------------------------------- the trainer file
def parse_trainer_spec(spec: str) -> Tuple[Path, str]:
    """Split ``FILE[:NAME]`` into the file and the function's name.

    Example::

        >>> parse_trainer_spec("/runs/fedhb.py:small")
        (PosixPath('/runs/fedhb.py'), 'small')
        >>> parse_trainer_spec("/runs/fedhb.py")[1]
        'make_trainer'
    """
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isidentifier() and len(head) > 1:  # (not a Windows drive letter)
        return Path(head), tail
    return Path(str(spec)), DEFAULT_FACTORY


def merged_deep_config(context_config: Optional[Mapping], overrides: Optional[Mapping]) -> Dict:
    """:data:`DEEP_CONFIG_DEFAULTS`, then the context's run config, then ``overrides``."""
    config = dict(DEEP_CONFIG_DEFAULTS)
    for source in (context_config or {}), (overrides or {}):
        config.update(dict(source))
    return config


def _trainer_options(config: Mapping) -> Dict[str, Any]:
    raw = config["trainer-options"]
    options = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if not isinstance(options, dict):
        raise ValueError(f"run config 'trainer-options' must be a JSON object, got {raw!r}")
    return options


def load_trainer(config: Mapping):
    """A new trainer from the run config's trainer file (see the module docstring),
    checked to run on Flower (:func:`check_trainer`)."""
    from ..modelfile import _import_file

    spec = str(config["trainer"])
    if not spec:
        raise ValueError(
            "the run config has no 'trainer': pass run_config={'trainer': "
            "'/abs/path/trainer.py:make_trainer'} (or --run-config to flwr run)"
        )
    path, name = parse_trainer_spec(spec)
    # Imported afresh: the nodes cache the trainer (node_trainer), the server builds one.
    module = _import_file(path.resolve())
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path} defines no function {name!r} returning a deep trainer")
    return check_trainer(factory(**_trainer_options(config)))


def check_trainer(trainer):
    """``trainer`` if its clients can train on Flower nodes (see the module docstring);
    else a ``TypeError`` / ``ValueError`` saying why."""
    from ..deep.fedhb import FedHB

    if not isinstance(trainer, FedHB):
        raise TypeError(
            f"a {type(trainer).__name__} does not run on Flower: only FedHB (and FedAvg / "
            "FedProx as its families, fedavg_family / fedprox_family), whose clients train "
            "from their message alone"
        )
    if trainer.start != "global":
        raise ValueError(
            "FedHB(start='own') does not run on Flower: each client's own m_i is kept on the "
            "server's trainer, not on its node; use start='global'"
        )
    return trainer


#: The trainers of this process's nodes, ``{(trainer, its file's mtime, trainer-options):
#: trainer}``: a node's trainer is read-only (every round's work comes from the message),
#: so the nodes a Ray worker serves share one, and a node serving runs of an edited file
#: builds it anew.
_NODE_TRAINERS: Dict[Tuple[str, float, str], Any] = {}


def node_trainer(config: Mapping):
    """The trainer a node trains its client with (built once per process and file)."""
    path = parse_trainer_spec(str(config["trainer"]))[0]
    mtime = path.stat().st_mtime if path.exists() else 0.0
    options = json.dumps(_trainer_options(config), sort_keys=True)
    key = (str(config["trainer"]), mtime, options)
    if key not in _NODE_TRAINERS:
        _NODE_TRAINERS[key] = load_trainer(config)
    return _NODE_TRAINERS[key]


# ---------------------------------------------------------------------- the client side
def train_client(trainer, client: int, message: Dict) -> Dict:
    """A node's work: client ``client`` of ``trainer`` trains from ``message`` alone,
    with the trainer's local solver (:meth:`~hbfl_pyro.deep.FederatedTrainer.local_updates`
    of that client, reading the message as in process); returns its reply message
    (:meth:`~hbfl_pyro.deep.FederatedTrainer.reply_message`), or ``{"client", "round",
    "error"}`` with the reason (as in process) if its training raised."""
    server_round = int(message["round"])
    engine = trainer.round_engine
    engine.sent = (server_round, {client: message})  # what local_updates reads
    try:
        replies = trainer.local_updates(server_round, [client])
    except Exception as exc:  # the client's failure, reported to the server
        return {"client": client, "round": server_round, "error": failure_reason(exc)}
    finally:
        engine.sent = (0, {})
    row = tuple(p[0] if isinstance(p, torch.Tensor) else None for p in reply_parts(replies))
    return trainer.reply_message(server_round, client, row)


def deep_client_app(run_config: Optional[Mapping] = None):
    """A Flower ``ClientApp`` training the node's client of a deep trainer.

    :param run_config: run-config entries overriding the context's
        (:data:`DEEP_CONFIG_DEFAULTS`), e.g. ``{"trainer": "/abs/fedhb.py"}``.

    The node holds client ``partition-id`` (its node config). ``train`` messages hold
    ``{"client", "message"}`` and are answered by :func:`train_client`; ``query``
    messages ``hello`` with the node's client.
    """
    _flwr()
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    overrides = dict(run_config or {})
    app = ClientApp()

    def partition(context) -> int:
        pid = int(dict(context.node_config).get("partition-id", -1))
        if pid < 0:
            raise ValueError(
                "the node has no 'partition-id'; start the SuperNode with --node-config \""
                'partition-id=0"'
            )
        return pid

    @app.train()
    def train(msg, context):
        config = merged_deep_config(context.run_config, overrides)
        body = decode(msg.content)
        client = int(body["client"])
        if client != partition(context):
            raise ValueError(
                f"the node of client {partition(context)} was sent client {client}'s message"
            )
        reply = train_client(node_trainer(config), client, body["message"])
        return Message(record_dict(reply), reply_to=msg)

    @app.query()
    def query(msg, context):
        action = str(msg.content["hbfl.query"]["action"])
        if action != "hello":
            raise ValueError(f"unknown query {action!r}")
        pid = partition(context)
        body = {"name": str(pid), "partition-id": pid, "schema": {}}
        return Message(record_dict(body), reply_to=msg)

    return app


# ---------------------------------------------------------------------- the server side
class DeepFlowerEngine(Engine):
    """Runs a deep trainer's round on Flower nodes through a ServerApp's ``grid``.

    :param trainer: the ServerApp's trainer (its hooks, :attr:`REPLY` and round counter).
    :param grid: the ServerApp's Flower ``Grid``.
    :param nodes: ``{client index: Flower node id}``.
    :param timeout: seconds a round waits for replies.
    :param poll: seconds between pulls for replies.

    :ivar traffic: per round, the payload bytes of each message sent (``bytes_down``)
        and of each reply received (``bytes_up``).

    Example (a ServerApp's work, :func:`run_deep_server`)::

        >>> engine = DeepFlowerEngine(trainer, grid, nodes, 600.0, 0.05)  # doctest: +SKIP
        >>> trainer.round_engine = engine  # doctest: +SKIP
        >>> trainer.run(3)  # its own rounds, the clients on the nodes  # doctest: +SKIP
    """

    def __init__(self, trainer, grid, nodes: Dict[int, int], timeout: float, poll: float):
        self.trainer = trainer
        self.grid = grid
        self.nodes = dict(nodes)
        self.timeout, self.poll = float(timeout), float(poll)
        self.traffic: List[Dict] = []

    def run_round(self, messages: Dict) -> Tuple[Any, Dict]:
        """Send ``{client: message}`` to the clients' nodes and collect the replies: as
        :meth:`DeepEngine.run_round <hbfl_pyro.engines.deep.DeepEngine.run_round>`, the
        good clients' rows in the order of ``messages`` and ``{client: reason}`` for the
        others, sorted by client."""
        from flwr.app import Message, MessageType

        trainer = self.trainer
        server_round = trainer.round + 1
        if any(message is None for message in messages.values()):
            raise TypeError("every client of a Flower round needs a message (check_trainer)")
        for client, message in messages.items():  # every message out before any trains
            trainer.deliver("down", client, message)
        sent = [
            (
                client,
                Message(
                    record_dict({"client": client, "message": message}),
                    dst_node_id=self.nodes[client],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                ),
            )
            for client, message in messages.items()
        ]
        answers = send_and_receive(self.grid, [m for _, m in sent], self.timeout, self.poll)
        good, failures, raised = self._collect(server_round, sent, answers)
        answered = [client for client, _ in sent if client in good]
        if not answered and failures and raised == set(failures):
            # As in process: every client raising is a bug in the code.
            client = min(failures)
            raise RuntimeError(
                f"round {server_round}: every client failed (first: client {client}: "
                f"{failures[client]}); the server state is unchanged"
            )
        for client, why in failures.items():
            logger.warning("hbfl: client %s (node %s) failed: %s", client, self.nodes[client], why)
        replies = None
        if answered:
            replies = join_rows(
                [
                    tuple(_row(good[client].get(name)) for name in trainer.REPLY)
                    if len(trainer.REPLY) > 1
                    else _row(good[client][trainer.REPLY[0]])
                    for client in answered
                ]
            )
        # (stacklevel 4 from here: the caller of the trainer's step, as the in-process
        # engine's warnings, run_round <- federated_round <- step <- caller)
        replies, failures = screen_replies(
            trainer, server_round, answered, replies, failures, stacklevel=4
        )
        return replies, {client: failures[client] for client in sorted(failures)}

    def _collect(self, server_round: int, sent, answers):
        """``({client: reply}, {client: reason}, clients whose training raised)``."""
        by_id = {msg.metadata.message_id: client for client, msg in sent}
        good: Dict[int, Dict] = {}
        errors: Dict[int, str] = {}
        raised = set()
        up = []
        for answer in answers:
            client = by_id.get(answer.metadata.reply_to_message_id)
            if client is None:
                continue
            if answer.has_error():
                errors[client] = error_text(answer)
                if "RAISED_EXCEPTION" in errors[client]:
                    raised.add(client)
                continue
            reply = decode(answer.content)
            up.append(num_bytes(answer.content))
            if "error" in reply:  # its local training raised
                errors[client] = str(reply["error"])
                raised.add(client)
            else:
                good[client] = reply
        self.traffic.append(
            {
                "round": server_round,
                "bytes_down": [num_bytes(msg.content) for _, msg in sent],
                "bytes_up": up,
            }
        )
        failures = {
            client: errors.get(client, "no reply within the round timeout")
            for client, _ in sent
            if client not in good
        }
        return good, failures, raised


def _row(part):
    """A reply part as a row of one client (``None`` stays ``None``)."""
    return part.unsqueeze(0) if isinstance(part, torch.Tensor) else part


def discover_nodes(grid, config: Mapping, num_clients: int) -> Dict[int, int]:
    """``{client index: node id}``: every node names its client (its ``partition-id``);
    the nodes must hold clients ``0..num_clients-1``, one each."""
    names, nodes, _ = discover_clients(grid, config)
    expected = [str(i) for i in range(num_clients)]
    if sorted(names, key=int) != expected:
        raise RuntimeError(
            f"the nodes hold clients {names}; the trainer has {num_clients} clients "
            f"(start one node per partition-id 0..{num_clients - 1})"
        )
    return {int(name): nodes[name] for name in names}


def run_deep_server(grid, config: Mapping) -> Dict:
    """The ServerApp's work: the trainer's own rounds (:meth:`~hbfl_pyro.deep.
    FederatedTrainer.run`, through :func:`~hbfl_pyro.rounds.federated_round`) with a
    :class:`DeepFlowerEngine` carrying each round's messages to the nodes.

    Returns ``{"round", "history", "state", "nodes", "traffic"}`` (``state``: the
    trainer's :meth:`~hbfl_pyro.deep.FederatedTrainer.state_dict`; ``stopped``: the
    :class:`~hbfl_pyro.ClientFailureError` that stopped the run, if one did), also
    written to ``out-dir/result.pt`` when the run config names one."""
    from ..failures import ClientFailureError

    trainer = load_trainer(config)
    nodes = discover_nodes(grid, config, trainer.num_clients)
    engine = DeepFlowerEngine(
        trainer, grid, nodes, float(config["round-timeout"]), float(config["poll-interval"])
    )
    trainer.round_engine = engine
    result: Dict[str, Any] = {}
    try:
        trainer.run(int(config["rounds"]))
    except ClientFailureError as exc:  # the run stops as in process; its rounds are kept
        result["stopped"] = str(exc)
    result.update(
        round=trainer.round,
        history=trainer.history,
        state=trainer.state_dict(),
        nodes=nodes,
        traffic=engine.traffic,
    )
    out = str(config["out-dir"])
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(out) / "result.pt")
    return result


def deep_server_app(run_config: Optional[Mapping] = None, on_result: Optional[Callable] = None):
    """A Flower ``ServerApp`` running a deep trainer's rounds (:func:`run_deep_server`).

    :param run_config: run-config entries overriding the context's
        (:data:`DEEP_CONFIG_DEFAULTS`).
    :param on_result: called with the result dict when the run ends (the simulation
        engine runs the ServerApp in this process); a deployment sets ``out-dir``.
    """
    _flwr()
    from flwr.serverapp import ServerApp

    overrides = dict(run_config or {})
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        result = run_deep_server(grid, merged_deep_config(context.run_config, overrides))
        if on_result is not None:
            on_result(result)

    return app


# ---------------------------------------------------------------------- simulation
def simulate_deep(
    trainer: str,
    rounds: int,
    trainer_options: Optional[Mapping[str, Any]] = None,
    *,
    num_cpus: Optional[int] = None,
    run_config: Optional[Mapping[str, Any]] = None,
    verbose: bool = False,
) -> Dict:
    """Run a deep trainer's rounds in Flower's simulation engine: one virtual node per
    client (node ``i`` trains client ``i``), the ServerApp in this process, the
    ClientApps in Ray workers bound to 127.0.0.1.

    :param trainer: ``FILE[:NAME]`` of a trainer file (see the module docstring).
    :param rounds: rounds to run.
    :param trainer_options: keywords for the trainer file's function (JSON values).
    :param num_cpus: CPUs Ray may use (default: up to 2); each ClientApp worker takes one.
    :param run_config: further run-config entries (:data:`DEEP_CONFIG_DEFAULTS`).
    :param verbose: keep Flower's INFO log.
    :returns: the ServerApp's result (:func:`run_deep_server`); load it into a trainer
        built by the same file with :func:`load_deep_result`.

    Example::

        >>> result = simulate_deep("/abs/fedhb_toy.py", 3)  # doctest: +SKIP
        >>> fit = make_trainer(); load_deep_result(fit, result)  # doctest: +SKIP
        >>> fit.global_weights()  # as after fit.run(3) in process  # doctest: +SKIP
    """
    _flwr()
    path, name = parse_trainer_spec(trainer)
    config = merged_deep_config(
        None,
        {
            "trainer": f"{path.resolve()}:{name}",  # the ClientApps run in other processes
            "trainer-options": json.dumps(dict(trainer_options or {})),
            "rounds": int(rounds),
            **dict(run_config or {}),
        },
    )
    num_clients = load_trainer(config).num_clients
    config["num-clients"] = config["num-clients"] or num_clients
    return run_apps(
        lambda on_result: deep_server_app(config, on_result=on_result),
        deep_client_app(config),
        num_clients,
        num_cpus=num_cpus,
        verbose=verbose,
    )


def load_deep_result(trainer, result: Mapping) -> None:
    """Load a Flower run's result into ``trainer``, built by the same trainer file and
    options: it continues as after the same rounds in process
    (:meth:`~hbfl_pyro.deep.FederatedTrainer.load_state_dict`)."""
    trainer.load_state_dict(result["state"])


__all__ = [
    "DEEP_CONFIG_DEFAULTS",
    "DeepFlowerEngine",
    "check_trainer",
    "deep_client_app",
    "deep_server_app",
    "discover_nodes",
    "load_deep_result",
    "load_trainer",
    "merged_deep_config",
    "node_trainer",
    "parse_trainer_spec",
    "run_deep_server",
    "simulate_deep",
    "train_client",
]
