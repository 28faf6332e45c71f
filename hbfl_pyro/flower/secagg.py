"""Secure aggregation: server updates from sums that travel through Flower's SecAgg+.

A server strategy whose update needs only the *sum over clients* of its replies declares
which entries (:meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout`): the
closed-form server its clients' summaries of ``q_i``, the second-order server its clients'
Laplace marginals with gradients and Hessians (and, in a PSIS round, their per-draw
log-likelihoods); every reply's ELBO term is summed too. With run config
``secagg = true`` these sums travel through Flower's SecAgg+ protocol
(:class:`SecAggEngine`, an :class:`~hbfl_pyro.engines.base.Engine` under
:meth:`hbfl_pyro.FederatedSVI.run`'s round loop), so the server only ever holds the sum,
from which it updates (:meth:`~hbfl_pyro.servers.base.ServerStrategy.aggregate_sum`;
the closed-form update is :meth:`hbfl_pyro.Server.aggregate`'s with
``participation="scaled"``).

What Flower 1.42's SecAgg+ computes (``flwr.server.workflow.SecAggPlusWorkflow`` on the
server, ``flwr.client.mod.secaggplus_mod`` on the client; read from the installed
source):

* **API**: the *legacy* one. The workflow is called with a ``LegacyContext`` holding a
  legacy ``Strategy``; it calls ``strategy.configure_fit`` (``FitIns`` per node) and
  ``strategy.aggregate_fit``. A round is four message exchanges (``setup``: public keys;
  ``share keys``: encrypted Shamir shares; ``collect masked vectors``: the ClientApp runs
  here and its ``FitRes`` is masked; ``unmask``: shares to remove the masks). We call the
  workflow once per round (what ``DefaultWorkflow(fit_workflow=...)`` does), so that the
  client discovery (:mod:`hbfl_pyro.flower.messaging`), history and result
  (:mod:`hbfl_pyro.flower.run`) of the plain ServerApp are kept.
* **Client** (``_collect_masked_vectors``): with ``w = num_examples`` of its ``FitRes``,
  ``q_ratio = round(w / max_weight * Q)``, the parameters are multiplied by
  ``q_ratio / Q``, **clipped** to ``[-c, c]`` (``c = clipping_range``), mapped to
  ``(x + c) * Q / (2c)`` and **stochastically rounded** to an int32 in ``[0, Q]``
  (``Q = quantization_range``); ``q_ratio`` is prepended; the private and pairwise masks
  (uniform in ``[0, M - 1)``, ``M = modulus_range``) are added mod ``M``. Its other
  ``FitRes`` fields (``num_examples``, ``metrics``, status) reach the server **in the
  clear**; the mod only empties the array records.
* **Server** (``unmask_stage``): the masked vectors are summed mod ``M``, the masks
  removed, ``K = sum_i k_i`` dequantised to ``K * 2c / Q - c``, the offset
  ``-(n - 1) c`` added (``n`` = clients that sent a masked vector), and the result
  multiplied by ``Q / sum_i q_ratio_i``: a **weighted average**
  ``sum_i q_ratio_i x_i / sum_i q_ratio_i``, not a sum. Every result passed to
  ``aggregate_fit`` carries that same aggregate as its ``parameters``.

How hbfl_pyro uses it:

* every client reports ``num_examples = 1`` and the server sets ``max_weight = 1``, so
  ``q_ratio = Q`` for everyone, the multiplication is by exactly 1, and the average is the
  plain mean; the server multiplies it by ``n`` (the number of results) to get the sum. The
  clients' real sizes are not sent (``num_examples`` would be in the clear), nor any
  metric.
* each client packs the summed entries of its reply ``s_i`` (the server's layout, paths in
  sorted order, flattened) and its ELBO term ``e_i`` into one vector divided element-wise
  by public bounds: ``v_i = [s_i / b, e_i / b_elbo]``, and ``c = 1``. A value outside its
  bound is **not clipped** (that would bias the posterior silently): the client raises,
  naming itself and the run-config key to raise; the protocol treats it as a dropout.
* **No per-client reply validation on the server.** In plain mode
  :meth:`~hbfl_pyro.Server.aggregate` inspects each reply (finite ELBO, keys, shapes,
  NaN/Inf) and leaves bad ones out; under SecAgg+ it cannot see individual replies, so each
  client checks its own reply (finite, the layout the server sent, within the bounds)
  before masking, and a client that fails the check drops out of the round.
* **Participation**: the server has the round's sum only, so partial participation is
  ``"scaled"`` (sum times ``N / n``). ``"stale"`` (each client's latest reply) needs
  individual replies: with ``fraction < 1`` it is rejected; with ``fraction = 1`` it equals
  ``"scaled"`` in every round where no client fails (in process, a failed client's stale
  reply would be reused; here the round's survivors are rescaled).
* **Gradient mode is not supported**: :func:`check_secagg_server` raises. (Gradients are
  sums too, but their scale is unknown in advance and the server's Adam step would need
  its own error analysis.) The second-order server's per-draw log-likelihoods are
  floored at ``-bound`` (:data:`FLOORED_AT_MINUS_BOUND`).

**Quantisation error.** With ``c = 1`` and every ``|v_ij| <= 1`` nothing is clipped; each
client's integer ``k_ij`` differs from ``(v_ij + 1) Q / 2`` by less than 1 (stochastic
rounding), the masks cancel exactly, and ``K_j = sum_i k_ij <= n Q < M`` does not wrap
around. Hence the decoded mean differs from ``(1/n) sum_i v_ij`` by less than ``2 / Q``, and
the decoded *sum* of element ``j`` (bound ``b_j``) from the true sum by less than
``2 n b_j / Q`` (:func:`sum_error_bound`; the float64 arithmetic adds a relative
``~1e-16``, covered by a ``1e-6`` relative slack). We take the largest ``Q`` for which
``n Q < M`` (and ``Q < 2^31``, the int32 of the rounding): ``Q = min(2^31 - 1, (M - 1) //
n)`` (:func:`quantization_range`). With Flower's default ``M = 2^32`` and 10 clients,
``Q = 429,496,729`` and the sum's error is below ``4.7e-8 b``. For the Normal–Normal
family ``loc = (mu0/s0^2 + S/tau^2) / (1/s0^2 + N/tau^2)``, with ``S`` the sum scaled to
the ``N`` clients (``N/n`` times the secure sum of the round's ``n`` clients), so the error
of ``loc`` is at most ``|dS| / N`` in the scaled sum, i.e. ``|dS_secure| / n``, and that of
``scale`` is zero.

One module, longer than most (about 700 lines, half of them this note and the docstrings):
the error analysis above and the packing, strategy and round loop it is about are read
together. What it shares with the plain apps is imported from
:mod:`hbfl_pyro.flower.config`, :mod:`hbfl_pyro.flower.messaging` and
:mod:`hbfl_pyro.flower.run`, never from :mod:`hbfl_pyro.flower.apps`.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import numpy as np
import torch

from ..engines.base import Engine, Failures, SecureSum
from ..server import ClientFailureWarning
from .config import SECAGG_CONFIG_DEFAULTS, flag
from .engine import ResumableRun
from .messaging import error_text, logger, send_and_receive
from .records import flatten, unflatten
from .run import run_with_engine

#: Relative slack for float64 rounding in the protocol's dequantisation (see module doc).
FLOAT_SLACK = 1e-6
_INT32_MAX = 2**31 - 1
_MESSAGE_KEY = "hbfl.message"
_LAYOUT_KEY = "hbfl.layout"


# ---------------------------------------------------------------------- quantisation
def quantization_range(num_clients: int, modulus: int = 2**32) -> int:
    """The largest quantisation range ``Q`` for which ``num_clients`` sums cannot wrap.

    Each client's integers lie in ``[0, Q]`` and the weights ``q_ratio = Q`` are summed as
    well, so ``num_clients * Q < modulus`` is needed; Flower rounds to int32, so ``Q < 2^31``.

    :param num_clients: clients sampled per round (at least 2 for SecAgg+).
    :param modulus: SecAgg+'s ``modulus_range`` (a power of 2).
    :returns: ``Q``.

    Example::

        >>> quantization_range(10)
        429496729
        >>> quantization_range(2)
        2147483647
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    q = min(_INT32_MAX, (int(modulus) - 1) // int(num_clients))
    if q < 2:
        raise ValueError(
            f"modulus {modulus} is too small for {num_clients} clients: raise secagg-modulus"
        )
    return q


def sum_error_bound(num_clients: int, bound: float, quant_range: int) -> float:
    """Worst-case error of one element of the securely summed vector (module doc).

    :param num_clients: clients whose vectors are summed.
    :param bound: the element's public bound ``b`` (``|x_i| <= b`` for every client).
    :param quant_range: SecAgg+'s ``quantization_range`` ``Q``.
    :returns: ``2 n b / Q`` plus a ``1e-6`` relative slack for float64 rounding.

    Example::

        >>> sum_error_bound(10, 1000.0, quantization_range(10)) < 5e-5
        True
    """
    return 2.0 * num_clients * float(bound) / quant_range * (1.0 + FLOAT_SLACK)


# ---------------------------------------------------------------------- packing
def summary_layout(shapes: Mapping[str, Sequence[int]]) -> List[Tuple[str, List[int]]]:
    """The vector layout of a client's reply: ``[(path, shape)]`` in sorted path order
    (paths as :meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout` gives them)."""
    return [(k, list(shapes[k])) for k in sorted(shapes)]


#: Reply entries floored at ``-bound`` (NaN and ``-inf`` included): the second-order
#: server's per-draw log-likelihoods of a PSIS round. A draw a client cannot evaluate
#: (``-inf``: weight 0) or whose log-likelihood is below ``-bound`` stays in the protocol's
#: range; its weight against a draw of typical log-likelihood ``l`` is at most
#: ``exp(-bound - l)``, 0 in float64 for the default bound unless every draw is that poor
#: (when k-hat flags the fit anyway). Values above ``+bound`` still raise.
FLOORED_AT_MINUS_BOUND = ("log_lik",)


def _entry(reply: Mapping, path: str, client: str):
    node: Any = reply
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(
                f"client {client!r}: the reply has no {path!r}, which the server's secure "
                "sum needs (the server and this client run different servers?)"
            )
        node = node[part]
    return node


def pack(
    reply: Mapping, layout: Sequence, bound: float, elbo_bound: float, client: str = "client"
) -> np.ndarray:
    """A client's reply as the vector it puts into SecAgg+: ``[entries / b, elbo / b_elbo]``.

    :param reply: the client's reply (:meth:`hbfl_pyro.Client.update` in closed-form mode,
        or a second-order client's).
    :param layout: :func:`summary_layout` of the entries the server sums (sent by it).
    :param bound: ``b``, the public bound on every summed element.
    :param elbo_bound: ``b_elbo``, the public bound on the client's ELBO term.
    :param client: the client's name, for errors.
    :returns: a float64 vector with every element in ``[-1, 1]``.
    :raises ValueError: naming the client when the reply is not finite, does not match the
        layout, or exceeds a bound (values are never clipped: that would bias the posterior).

    Example::

        >>> reply = {"stats": {"sum_mean": torch.tensor([2.5]), "count": torch.tensor(1.0)},
        ...          "elbo": -30.0}
        >>> layout = summary_layout({"stats/sum_mean": (1,), "stats/count": ()})
        >>> pack(reply, layout, 10.0, 100.0).tolist()
        [0.1, 0.25, -0.3]
    """
    parts = []
    for path, shape in layout:
        t = _entry(reply, path, client)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"client {client!r}: reply[{path!r}] has shape {got}, expected {tuple(shape)}"
            )
        values = t.detach().reshape(-1).to(torch.float64).cpu().numpy()
        if path.rsplit("/", 1)[-1] in FLOORED_AT_MINUS_BOUND:
            values = np.where(np.isnan(values), -bound, np.maximum(values, -bound))
        parts.append(values)
    values = np.concatenate(parts) if parts else np.zeros(0)
    elbo = reply.get("elbo")
    if isinstance(elbo, torch.Tensor) and elbo.numel() == 1:
        elbo = float(elbo)
    if not isinstance(elbo, (int, float)) or not math.isfinite(elbo):
        raise ValueError(f"client {client!r}: its ELBO {elbo!r} is not a finite number")
    if not np.isfinite(values).all():
        raise ValueError(f"client {client!r}: its reply holds NaN or Inf")
    if values.size and np.abs(values).max() > bound:
        raise ValueError(
            f"client {client!r}: a summed value {np.abs(values).max():.6g} exceeds the "
            f"SecAgg+ bound {bound:g}; raise the run config's secagg-bound (values are not "
            "clipped, which would bias the posterior)"
        )
    if abs(elbo) > elbo_bound:
        raise ValueError(
            f"client {client!r}: its ELBO term {elbo:.6g} exceeds the SecAgg+ bound "
            f"{elbo_bound:g}; raise the run config's secagg-elbo-bound"
        )
    return np.concatenate([values / bound, [elbo / elbo_bound]]).astype(np.float64)


def unpack(
    vector: np.ndarray, layout: Sequence, bound: float, elbo_bound: float
) -> Tuple[Dict[str, torch.Tensor], float]:
    """Invert :func:`pack` on a *sum* of packed vectors: ``({path: sum}, summed ELBO)``.

    Example::

        >>> layout = summary_layout({"stats/sum_mean": (1,), "stats/count": ()})
        >>> sums, elbo = unpack(np.array([0.3, 0.5, -0.6]), layout, 10.0, 100.0)
        >>> sums["stats/sum_mean"].tolist(), float(sums["stats/count"]), elbo
        ([5.0], 3.0, -60.0)
    """
    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if vector.size != sum(sizes) + 1:
        raise ValueError(
            f"the secure aggregate has {vector.size} values; the layout {layout} needs "
            f"{sum(sizes) + 1}"
        )
    sums, start = {}, 0
    for (path, shape), size in zip(layout, sizes):
        part = vector[start : start + size] * bound
        sums[path] = torch.from_numpy(part.copy()).reshape(shape)
        start += size
    return sums, float(vector[-1] * elbo_bound)


# ---------------------------------------------------------------------- messages
def to_fitins(
    message: Mapping,
    layout: Sequence,
    bound: float,
    elbo_bound: float,
    mode: str = "closed_form",
    resume: Optional[Tuple[int, int]] = None,
):
    """The server's message as a legacy ``FitIns``.

    The tensors go into ``parameters`` (NumPy's format: float64 bit for bit), the tree's
    skeleton, the layout of the summed entries, the bounds, the server's mode and, in a
    resumed run, ``resume`` (:meth:`~hbfl_pyro.flower.engine.ResumableRun.resume_of`)
    into ``config``.
    """
    from flwr.common import FitIns, Scalar, ndarrays_to_parameters

    skeleton, tensors = flatten(dict(message))
    arrays = [np.ascontiguousarray(t.cpu().numpy()) for t in tensors.values()]
    spec = {"layout": layout, "bound": bound, "elbo_bound": elbo_bound, "mode": mode}
    if resume is not None:
        spec["resume"] = list(resume)
    config: Dict[str, Scalar] = {
        _MESSAGE_KEY: json.dumps({"skeleton": skeleton, "keys": list(tensors)}),
        _LAYOUT_KEY: json.dumps(spec),
    }
    return FitIns(parameters=ndarrays_to_parameters(arrays), config=config)


def from_fitins(fitins) -> Tuple[Dict, List, float, float, str]:
    """Invert :func:`to_fitins`: ``(message, layout, bound, elbo_bound, mode)``."""
    from flwr.common import parameters_to_ndarrays

    body = json.loads(str(fitins.config[_MESSAGE_KEY]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    tensors = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(body["keys"], arrays)}
    spec = json.loads(str(fitins.config[_LAYOUT_KEY]))
    message = unflatten(body["skeleton"], tensors)
    return message, spec["layout"], spec["bound"], spec["elbo_bound"], spec["mode"]


def fitins_resume(fitins) -> Optional[Tuple[int, int]]:
    """The ``resume`` :func:`to_fitins` was given (a resumed run), else ``None``."""
    resume = json.loads(str(fitins.config[_LAYOUT_KEY])).get("resume")
    return None if resume is None else (int(resume[0]), int(resume[1]))


def is_secagg_message(msg) -> bool:
    """Whether a ``train`` message belongs to the SecAgg+ protocol."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def client_train(msg, context, name: str, update: Callable) -> Any:
    """The ClientApp's ``train`` handler for SecAgg+ messages (all four stages).

    Runs Flower's ``secaggplus_mod``; in its ``collect masked vectors`` stage the mod
    calls back here: the server's message is decoded from the ``FitIns``, ``update``
    (``(message, finish, mode, resume) -> finish(reply)``, which must store the client's
    state only if ``finish`` returns; ``mode`` is the server's, ``resume`` that of a
    resumed run, see :func:`fitins_resume`) runs the client's update, and the
    reply is packed
    (:func:`pack`, which checks it) into a ``FitRes`` with ``num_examples = 1`` and no
    metrics. The mod masks the vector and empties the array records before replying.
    """
    from flwr.app import Message
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    def fit(inner, ctxt):
        fitins = compat.recorddict_to_fitins(inner.content, keep_input=True)
        message, layout, bound, elbo_bound, mode = from_fitins(fitins)

        def finish(reply):
            return pack(reply, layout, bound, elbo_bound, client=name)

        vector = update(message, finish, mode, fitins_resume(fitins))
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([vector]),
            num_examples=1,  # every weight 1: the protocol then averages (see module doc)
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=inner)

    return secaggplus_mod(msg, context, fit)


# ---------------------------------------------------------------------- server side
def content_bytes(msg) -> int:
    """Serialized size (protobuf) of a message's content; 0 for an error reply."""
    from flwr.common.serde import recorddict_to_proto

    if not msg.has_content():
        return 0
    return int(recorddict_to_proto(msg.content).ByteSize())


def _short_error(text: str) -> str:
    """The ClientApp's own exception message out of a Ray/Flower error reply."""
    code, _, reason = text.partition(": ")
    marker = "Message: "
    if marker in reason:  # keep the error code, drop the Ray traceback
        return f"{code}: {reason.rsplit(marker, 1)[1].rstrip(chr(39) + '> ').strip()}"
    return text


def _array_bytes(msg) -> int:
    if not msg.has_content():
        return 0
    return int(sum(len(a.data) for r in msg.content.array_records.values() for a in r.values()))


class RecordingGrid:
    """A Flower grid that polls fast and records what the server sends and receives.

    ``send_and_receive`` is :func:`hbfl_pyro.flower.messaging.send_and_receive` (a deployment's
    grid sleeps 3 s between pulls; SecAgg+ makes four exchanges a round). Every message
    is logged in :attr:`log`: direction, node, serialized content bytes, the bytes of its
    array records, and for a reply its error text; everything else goes to the grid.
    """

    def __init__(self, grid, timeout: float, poll: float):
        self._grid, self._timeout, self._poll = grid, timeout, poll
        self.log: List[Dict] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: Optional[float] = None):
        messages = list(messages)
        for m in messages:
            self.log.append(
                {"dir": "down", "node": m.metadata.dst_node_id, "bytes": content_bytes(m)}
            )
        limit = self._timeout if timeout is None else timeout
        replies = send_and_receive(self._grid, messages, limit, self._poll)
        for r in replies:
            entry = {
                "dir": "up",
                "node": r.metadata.src_node_id,
                "bytes": content_bytes(r),
                "array_bytes": _array_bytes(r),
                "error": _short_error(error_text(r)) if r.has_error() else None,
            }
            if r.has_content():
                metrics = r.content.config_records.get("fitres.metrics")
                entry["metrics"] = dict(metrics) if metrics is not None else None
                counts = r.content.metric_records.get("fitres.num_examples")
                entry["num_examples"] = counts["num_examples"] if counts is not None else None
            self.log.append(entry)
        return replies


class SecAggStrategy:
    """The legacy Flower strategy that ``SecAggPlusWorkflow`` drives, as a pass-through:
    :meth:`configure_fit` returns the ``FitIns`` the engine prepared for the round
    (:meth:`prepare`), and :meth:`aggregate_fit` keeps the secure *mean* of the packed
    vectors (the same aggregate in every result) with the names of the clients in it.

    :param nodes: ``{client name: Flower node id}``.
    """

    def __init__(self, nodes: Dict[str, int]):
        self.names = {nid: name for name, nid in dict(nodes).items()}
        self._pairs: Dict[int, List] = {}
        #: ``{round: (client names, mean vector or None, distinct aggregates received)}``.
        self.results: Dict[int, Tuple[List[str], Optional[np.ndarray], int]] = {}

    def prepare(self, server_round: int, pairs: List) -> None:
        """The round's ``[(client proxy, FitIns)]``."""
        self._pairs[server_round] = pairs

    def configure_fit(self, server_round: int, parameters, client_manager) -> List:
        return self._pairs.pop(server_round, [])

    def aggregate_fit(self, server_round: int, results, failures) -> Tuple[None, Dict]:
        from flwr.common import parameters_to_ndarrays

        names = [self.names[proxy.node_id] for proxy, _ in results]
        # What the server holds: one aggregate, shared by every result (never a vector of
        # a single client); counted so that the tests can check it.
        distinct = len({bytes(b"".join(fr.parameters.tensors)) for _, fr in results})
        mean = parameters_to_ndarrays(results[0][1].parameters)[0] if results else None
        self.results[server_round] = (names, mean, distinct)
        return None, {}

    # The workflow never calls these (no centralised or federated evaluation).
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def check_secagg_server(server, fraction_clients: int) -> None:
    """Raise ``ValueError`` unless SecAgg+ can run this server: one whose update needs only
    the sum of the replies (closed form without DP or stale partial participation; the
    second-order server), and at least 2 clients a round.

    :param server: the server strategy (:class:`~hbfl_pyro.Server`, ...).
    :param fraction_clients: the number of clients sampled per round.
    """
    if fraction_clients < 2:
        raise ValueError(
            f"SecAgg+ needs at least 2 clients a round, this run samples {fraction_clients}; "
            "raise fraction or add clients"
        )
    try:
        server.sum_layout(1)
    except NotImplementedError as exc:
        raise ValueError(f"SecAgg+ cannot run this fit: {exc}") from exc


class SecAggEngine(ResumableRun, Engine):
    """A round's clients answer through Flower's SecAgg+: the server gets only their sum.

    Each round the engine packs the server strategy's messages with the round's layout
    (:meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout`) and the public bounds into
    ``FitIns``, runs one call of ``SecAggPlusWorkflow`` (four exchanges), and returns a
    :class:`~hbfl_pyro.engines.base.SecureSum` (the decoded sums, the clients in them, and
    the round's ``secagg`` record: aggregates received, ``Q`` and the sums' error bounds);
    the clients left out are the round's failures.

    :param grid: the ServerApp's grid.
    :param context: the ServerApp's ``Context``.
    :param server: the server strategy (its :meth:`sum_layout`).
    :param nodes: ``{client name: Flower node id}``.
    :param config: the merged run config (``secagg-*`` keys: :data:`SECAGG_CONFIG_DEFAULTS`).
    """

    def __init__(self, grid, context, server, nodes: Dict[str, int], config: Mapping):
        from flwr.server import ServerConfig
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.strategy import Strategy
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.serverapp import Grid

        self.server, self.nodes = server, dict(nodes)
        timeout, poll = float(config["round-timeout"]), float(config["poll-interval"])
        self.per_round = len(server.select(1))
        check_secagg_server(server, self.per_round)
        self.bound, self.elbo_bound = (
            float(config["secagg-bound"]),
            float(config["secagg-elbo-bound"]),
        )
        self.modulus = int(config["secagg-modulus"])
        self.quant = quantization_range(self.per_round, self.modulus)
        self.recording = RecordingGrid(grid, timeout, poll)
        # Duck-typed stand-ins, not subclasses (Flower is imported only here): RecordingGrid
        # forwards every Grid method to the ServerApp's grid; SecAggStrategy has the legacy
        # Strategy's methods that SecAggPlusWorkflow calls.
        self._grid = cast(Grid, self.recording)
        manager = SimpleClientManager()
        self._proxies = {}
        for nid in self.nodes.values():
            self._proxies[nid] = GridClientProxy(nid, self._grid, int(context.run_id))
            manager.register(self._proxies[nid])
        self.strategy = SecAggStrategy(self.nodes)
        self._legacy = LegacyContext(
            context,
            config=ServerConfig(num_rounds=1),
            strategy=cast(Strategy, self.strategy),
            client_manager=manager,
        )
        self._workflow = SecAggPlusWorkflow(
            num_shares=config["secagg-num-shares"],
            reconstruction_threshold=config["secagg-threshold"],
            max_weight=1.0,
            clipping_range=1.0,
            quantization_range=self.quant,
            modulus_range=self.modulus,
            timeout=timeout,
        )
        self.traffic: List[Dict] = []

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Any, Failures]:
        from flwr.app import ArrayRecord, ConfigRecord

        sent = list(messages)
        server_round = int(messages[sent[0]]["round"])
        layout = summary_layout(self.server.sum_layout(server_round))
        pairs = [
            (
                self._proxies[self.nodes[name]],
                to_fitins(
                    messages[name],
                    layout,
                    self.bound,
                    self.elbo_bound,
                    self.server.mode,
                    self.resume_of(name),
                ),
            )
            for name in sent
        ]
        self.strategy.prepare(server_round, pairs)
        first = len(self.recording.log)
        state = self._legacy.state
        state.config_records["config"] = ConfigRecord({"current_round": server_round})
        state.array_records["parameters"] = ArrayRecord()
        self._workflow(self._grid, self._legacy)
        log = self.recording.log[first:]
        errors: Dict[str, str] = {}
        for entry in log:
            if entry["dir"] == "up" and entry.get("error"):
                name = self.strategy.names.get(entry["node"], str(entry["node"]))
                errors.setdefault(name, entry["error"])
        names, mean, distinct = self.strategy.results.pop(server_round, ([], None, 0))
        self._record_traffic(server_round, sent, log)
        if mean is None and errors and len(errors) == len(sent):
            if all("RAISED_EXCEPTION" in why for why in errors.values()):
                name, why = sorted(errors.items())[0]
                raise RuntimeError(
                    f"every client failed round {server_round} (first: {name!r}: {why}); "
                    "the server state is unchanged"
                )
        failures = {
            name: errors.get(name, "dropped out of the secure aggregation")
            for name in sent
            if name not in names
        }
        for name, why in failures.items():
            logger.warning("hbfl round %d: client %r failed: %s", server_round, name, why)
            warnings.warn(
                f"round {server_round}: client {name!r} (node {self.nodes[name]}) failed: "
                f"{why}; it is left out of this round",
                ClientFailureWarning,
                stacklevel=2,
            )
        total: Dict[str, Any] = {}
        if mean is not None:
            sums, elbo = unpack(mean * len(names), layout, self.bound, self.elbo_bound)
            total = {**sums, "elbo": elbo}
        n = max(len(names), 1)
        info = {
            "aggregates": distinct,
            "quantization_range": self.quant,
            "sums": {k: v.clone() for k, v in total.items() if k != "elbo"},
            "elbo_sum": total.get("elbo"),
            "sum_error_bound": sum_error_bound(n, self.bound, self.quant),
            "elbo_error_bound": sum_error_bound(n, self.elbo_bound, self.quant),
        }
        return SecureSum(total, names, {"secagg": info}), failures

    def _record_traffic(self, server_round: int, sent: List[str], log: List[Dict]) -> None:
        down = {nid: 0 for nid in self.nodes.values()}
        up = {nid: 0 for nid in self.nodes.values()}
        for entry in log:
            side = down if entry["dir"] == "down" else up
            if entry["node"] in side:
                side[entry["node"]] += entry["bytes"]
        self.traffic.append(
            {
                "round": server_round,
                "bytes_down": [down[self.nodes[n]] for n in sent],
                "bytes_up": [up[self.nodes[n]] for n in sent],
                "replies": [
                    dict(e, node=self.strategy.names.get(e["node"], e["node"]))
                    for e in log
                    if e["dir"] == "up"
                ],
            }
        )


def apply_sums(
    server,
    server_round: int,
    sums: Optional[Dict[str, torch.Tensor]],
    elbo_sum: Optional[float],
    clients: Sequence[str],
    failed: Sequence[str] = (),
) -> Dict:
    """Deprecated (one release): :meth:`hbfl_pyro.Server.aggregate_sum` with
    ``{"stats/<key>": sum, "elbo": elbo_sum}``."""
    warnings.warn(
        "apply_sums is deprecated: use server.aggregate_sum(round, total, clients, failed)",
        DeprecationWarning,
        stacklevel=2,
    )
    total: Dict[str, Any] = {f"stats/{k}": v for k, v in (sums or {}).items()}
    total["elbo"] = elbo_sum
    return server.aggregate_sum(server_round, total, list(clients) if sums else [], failed)


def run_secagg_server(grid, config: Mapping, context) -> Dict:
    """The ServerApp's work under SecAgg+: :func:`~hbfl_pyro.flower.apps.run_server` with a
    :class:`SecAggEngine` in place of the plain Flower engine.

    :param grid: the ServerApp's grid.
    :param config: the merged run config (``secagg-*`` keys: :data:`SECAGG_CONFIG_DEFAULTS`).
    :param context: the ServerApp's ``Context`` (wrapped in a ``LegacyContext``).
    :returns: the result dict of :func:`~hbfl_pyro.flower.server_app`; each history record
        also holds ``secagg`` (the decoded sums, the number of distinct aggregates the
        strategy received, ``Q`` and the error bound of the sums) and ``traffic`` holds
        the serialized bytes each client sent and received over the round's four stages.
    """

    def secagg_engine(fit, nodes: Dict[str, int], cfg: Dict) -> SecAggEngine:
        return SecAggEngine(grid, context, fit.server, nodes, cfg)

    def protocol(engine: SecAggEngine) -> Dict:
        return {
            "secagg": {
                "quantization_range": engine.quant,
                "modulus": engine.modulus,
                "bound": engine.bound,
                "elbo_bound": engine.elbo_bound,
                "clients_per_round": engine.per_round,
            }
        }

    return run_with_engine(grid, config, secagg_engine, protocol)


__all__ = [
    "FLOORED_AT_MINUS_BOUND",
    "SECAGG_CONFIG_DEFAULTS",
    "RecordingGrid",
    "SecAggEngine",
    "SecAggStrategy",
    "apply_sums",
    "check_secagg_server",
    "client_train",
    "content_bytes",
    "flag",
    "fitins_resume",
    "from_fitins",
    "is_secagg_message",
    "pack",
    "quantization_range",
    "run_secagg_server",
    "sum_error_bound",
    "summary_layout",
    "to_fitins",
    "unpack",
]
