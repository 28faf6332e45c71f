"""FedHB for neural networks (method.md §4): the NIW hierarchy over all weights of a network.

Each client ``i`` holds a copy of one network; ``theta_i`` in ``R^d`` is the vector of all
its weights and ``q_i(theta_i) = N(m_i, eps^2 I)``. The global ``phi = (mu, Sigma)`` has
the per-coordinate (:class:`~hbfl_pyro.NIWDiag`) or isotropic (:class:`~hbfl_pyro.NIWIso`)
family as prior and, in the same form, as ``q(phi)`` (full covariance,
:class:`~hbfl_pyro.NIWFull`, works for tiny networks only). A round:

1. the server samples clients (``fraction``) and sends ``q(phi)``'s parameters;
2. each client starts at ``m0`` and runs local epochs of SGD/Adam (batch 32) on its block
   of the ELBO in the ``eps -> 0`` limit (the likelihood is evaluated at ``m_i``; the
   ``eps^2`` terms do not depend on ``m_i``)::

       L_i(m) = (n_i / |B|) sum_{b in B} -log p(y_b | x_b, m) - E_q(phi)[log p(m | phi)]

   the second term being ``family.expected_log_prior``: a learned Mahalanobis prox,
   ``0.5 (a / b) ||m - m0||^2`` (iso) or ``0.5 sum_k (a_k / b_k) (m_k - m0_k)^2`` (diag);
3. each client replies with ``family.client_summary(m_i, eps^2 1)``; the server sums them
   (weighted, see below) and sets ``q(phi)`` to the exact maximiser of its block,
   ``family.server_update``.

Two choices are explicit flags because they change the method (the issue notes a naive
version losing to FedAvg):

- ``participation``: ``"scaled"`` multiplies the round's sums by ``N / |S|`` (unbiased);
  ``"stale"`` keeps every client's latest summary (``m0`` then averages old and new
  client solutions, which lags when few clients take part per round);
- ``weighting``: ``"equal"`` (the hierarchy as written: every client is one draw from
  ``p(theta | phi)``) or ``"size"`` (client ``i``'s summary counts ``N n_i / sum_j n_j``
  times, so ``m0`` is FedAvg's data-size-weighted average).

The special cases (method.md §5), tested against independent FedAvg / FedProx code
(``tests/test_deep_special_cases.py``): :func:`fedavg_family` (prox weight below float64
resolution, ``lambda0 -> 0``) with ``weighting="size"`` is FedAvg; :func:`fedprox_family`
(``q(sigma2)`` a point mass at ``1 / P``) is FedProx with ``mu_i = P / n_i`` per client,
i.e. FedProx(mu) when all clients hold ``n = P / mu`` examples.

**Hyper-priors are stated per parameter** (method.md §4, the high-dimension trap):
:func:`iso_prior` and :func:`diag_prior` take the prox weight per coordinate at the prior
(``a0 / b0``) and its strength in pseudo-clients, so neither depends on ``d``.

The same hierarchy as an ordinary Pyro model is :func:`network_model`; fitted by
:class:`~hbfl_pyro.FederatedSVI` with ``server=family`` and ``AutoDelta`` local guides, its
client block has exactly the value and gradient of :func:`client_objective` (tested).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.func import vmap

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import num_clients
from ..dp import DPConfig
from ..engines.deep import DeepEngine
from ..failures import MAX_FAILED_ROUNDS, FailureRule
from ..families.base import ClosedFormFamily, Params
from ..families.niw import NIWDiag, NIWFull, NIWIso
from ..participation import check_participation
from ..rounds import federated_round
from ..server import ClientFailureWarning
from ..servers.closed_form import BLOCK, FamilyServer, summed_summaries
from ..servers.dp import FamilyDifferentialPrivacy
from .data import ClientSplit
from .local import (
    LocalSpec,
    Penalty,
    QuadraticPenalty,
    batch_schedule,
    engine_name,
    schedules_for,
    select_clients,
    train_loop,
    train_vmap,
)
from .nets import FlatNet, WeightFunction

__all__ = [
    "FedHB",
    "FedProxFamily",
    "FederatedTrainer",
    "client_objective",
    "diag_prior",
    "fedavg_family",
    "fedprox_family",
    "iso_prior",
    "network_model",
    "prox_weight",
]

ClientLike = Union[ClientSplit, Tuple[torch.Tensor, torch.Tensor]]

#: ``on_message(direction, client, message)``: the core's message hook
#: (:data:`hbfl_pyro.engines.inprocess.MessageHook`), ``direction`` ``"down"`` (server to
#: client) or ``"up"`` (client to server).
MessageHook = Callable[[str, Any, Dict], None]


# --------------------------------------------------------------------------------------
# Hyper-priors stated per parameter
# --------------------------------------------------------------------------------------


def iso_prior(
    init: torch.Tensor,
    prox_weight: float = 1.0,
    pseudo_clients: float = 1.0,
    lambda0: float = 1e-3,
) -> NIWIso:
    """The isotropic family with its hyper-prior stated per coordinate.

    ``sigma2 ~ IG(a0, b0)`` with ``a0 = pseudo_clients * d / 2`` and ``b0 = a0 / prox_weight``:
    at the prior the prox weight ``a / b`` is ``prox_weight`` per coordinate, and the
    hyper-prior weighs as much as ``pseudo_clients`` clients (each adds ``d / 2`` to
    ``a``). ``mu ~ N(init, sigma2 / lambda0 I)``: centred at the network's initial
    weights (a zero mean would start every client at the all-zero network, whose hidden
    units are symmetric), and nearly flat (``lambda0`` small) so ``m0`` is the clients'
    average.

    :param init: the initial weights ``(d,)`` (their dtype and device are used).
    :param prox_weight: prior prox precision per coordinate, on the summed-NLL scale
        (FedProx's ``mu`` for a client of ``n`` examples is ``prox_weight / n``).

    Example::

        >>> import torch
        >>> fam = iso_prior(torch.zeros(1000), prox_weight=2.0)
        >>> p = fam.init_params()
        >>> float(p["a"] / p["b"])
        2.0
    """
    d = init.shape[-1]
    a0 = pseudo_clients * d / 2.0
    return NIWIso(d, mu0=init.detach(), lambda0=lambda0, a0=a0, b0=a0 / prox_weight)


def diag_prior(
    init: torch.Tensor,
    prox_weight: float = 1.0,
    pseudo_clients: float = 4.0,
    lambda0: float = 1e-3,
) -> NIWDiag:
    """The per-coordinate family, hyper-prior per coordinate: ``a0 = pseudo_clients / 2``,
    ``b0 = a0 / prox_weight`` for every weight, ``mu ~ N(init, sigma2 / lambda0)``.

    Keep ``pseudo_clients > 2`` (``a0 > 1``) if the model is also run under Pyro: the
    point value ``E[sigma2] = b / (a - 1)`` exists only for ``a > 1``.

    Example::

        >>> import torch
        >>> fam = diag_prior(torch.zeros(3), prox_weight=0.5)
        >>> (fam.init_params()["a"] / fam.init_params()["b"]).tolist()
        [0.5, 0.5, 0.5]
    """
    d = init.shape[-1]
    a0 = pseudo_clients / 2.0
    return NIWDiag(d, mu0=init.detach(), lambda0=lambda0, a0=a0, b0=a0 / prox_weight)


def fedavg_family(init: torch.Tensor) -> NIWIso:
    """The FedAvg limit (method.md §5): a vague covariance hyper-prior, ``lambda0 -> 0``.

    ``b0 = 1e300`` makes ``a / b <= 1e-290`` whatever the clients send: the prox gradient
    is below float64 resolution of any non-zero gradient, so local training is FedAvg's;
    ``lambda0 = 1e-300`` makes ``m0`` the (weighted) average of the clients' ``m_i`` to
    round-off. Use with ``weighting="size"`` for FedAvg's weights. Needs float64 (in
    float32, ``1e300`` is infinite).
    """
    return NIWIso(init.shape[-1], mu0=init.detach(), lambda0=1e-300, a0=1.0, b0=1e300)


def fedprox_family(init: torch.Tensor, prox_weight: float) -> NIWIso:
    """The FedProx limit (method.md §5): ``q(sigma2)`` a point mass at ``1 / prox_weight``.

    ``a0 = 1e250`` and ``b0 = a0 / prox_weight``: the clients' ``N d / 2`` and scatter are
    below the resolution of ``a0`` and ``b0``, so ``a / b = prox_weight`` after every
    update, and ``lambda0 = 1e-300`` makes ``m0`` the average. A client of ``n_i`` examples
    then minimises ``mean NLL + (prox_weight / n_i) / 2 ||m - m0||^2`` (normalised
    objective): FedProx with ``mu_i = prox_weight / n_i``. Float64 only.
    """
    a0 = 1e250
    return NIWIso(init.shape[-1], mu0=init.detach(), lambda0=1e-300, a0=a0, b0=a0 / prox_weight)


class FedProxFamily(ClosedFormFamily):
    """FedProx's (and, with ``mu = 0``, FedAvg's) server family, exact in any dtype.

    The hierarchy ``theta_i ~ N(mu, I / (mu_prox n_i))`` with a flat prior on ``mu``: the
    covariance is fixed, and stated *per example*, so a client of ``n_i`` examples has
    prox precision ``mu_prox n_i`` on the summed-NLL scale, i.e. minimises
    ``mean NLL + mu_prox / 2 ||m - m0||^2`` (normalised objective): FedProx(``mu_prox``)
    with the same ``mu`` for every client, as in the FedProx paper. ``q(mu)`` is a point
    mass at the weighted mean of the clients' ``m_i`` (the strategy's weights: with
    ``weighting="size"``, FedAvg's; that is also the exact posterior mean of ``mu`` under
    the per-client precisions ``mu_prox n_i``).

    :func:`fedprox_family` reaches FedProx only as a limit of the NIW family, with one
    prox weight for all clients (``mu_i = P / n_i``) and in float64; this family is FedProx
    itself, in float32 too. :class:`~hbfl_pyro.deep.FedProx` is
    ``FedHB(net, clients, FedProxFamily(init, mu), weighting="size")``.

    :param init: the initial weights ``(d,)``: ``q(mu)``'s starting point.
    :param mu: FedProx's per-example coefficient ``mu_prox >= 0`` (0: FedAvg, no prox).

    Example::

        >>> import torch
        >>> fam = FedProxFamily(torch.zeros(2), mu=0.1)
        >>> sums = fam.weighted_summary_sums(
        ...     torch.tensor([1.0, 3.0]), torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor(0.0))
        >>> fam.server_update(sums, 2)["m0"].tolist()
        [1.0, 3.0]
        >>> pen = fam.client_penalty(fam.init_params())  # per example: times n_i
        >>> float(pen(torch.tensor([3.0, 4.0]), 10))
        12.5
    """

    covariance = "diag"

    def __init__(self, init: torch.Tensor, mu: float = 0.0):
        mu = float(mu)
        if not mu >= 0.0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.d = init.shape[-1]
        self.mu0 = init.detach()
        self.mu = mu

    def init_params(self) -> Params:
        """``{"m0": init}``: the global weights before any client has replied."""
        return {"m0": self.mu0.clone()}

    def client_summary(self, mean: torch.Tensor, cov: torch.Tensor) -> Params:
        """``{"sum_m": m_i, "count": 1}`` (the covariance is fixed: no second moment)."""
        return {"sum_m": mean, "count": mean.new_ones(mean.shape[:-1])}

    def weighted_summary_sums(
        self, weights: torch.Tensor, means: torch.Tensor, var: torch.Tensor
    ) -> Params:
        """``sum_m = w @ m`` and ``count = sum w``, one contraction."""
        return {"sum_m": torch.tensordot(weights, means, dims=1), "count": weights.sum()}

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        """``m0 = sum_m / count``: the weighted mean of the clients' ``m_i``."""
        return {"m0": sums["sum_m"] / sums["count"]}

    def expected_log_prior(self, theta: torch.Tensor, params: Params) -> torch.Tensor:
        """Per example, up to a constant: ``-mu / 2 ||theta - m0||^2`` (a client's prox
        is ``n_i`` times it: :meth:`client_penalty`)."""
        return -0.5 * self.mu * (theta - params["m0"]).pow(2).sum(-1)

    def client_penalty(self, params: Params) -> Penalty:
        """The clients' prox ``n_i mu / 2 ||theta - m0||^2`` (``None`` for ``mu = 0``:
        FedAvg trains without one)."""
        if not self.mu:
            return None
        return QuadraticPenalty(params["m0"], self.mu, per_example=True)


def prox_weight(family: ClosedFormFamily, params: Params) -> torch.Tensor:
    """The clients' prox precision ``E_q[Sigma^{-1}]`` per coordinate: ``a / b`` (iso: a
    scalar; diag: ``(d,)``) or ``n0 diag(V0^{-1})`` (full), on the summed-NLL scale."""
    if isinstance(family, NIWFull):
        return params["n0"] * torch.linalg.inv(params["V0"]).diagonal()
    return params["a"] / params["b"]


# --------------------------------------------------------------------------------------
# The federated trainer (plain torch)
# --------------------------------------------------------------------------------------


def _copy(value):
    """A copy of nested dicts, lists and tuples of tensors (tensors cloned)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


#: What the deep trainers tell the user when a client keeps failing.
DEEP_REMEDY = (
    "its data would be missing from the model. Check those clients' data and local "
    "training (the ClientFailureWarnings above give each error), or leave them out of the "
    "trainer's clients"
)


def _setting(value):
    """A setting as a plain value for :meth:`FederatedTrainer.fingerprint`: a family by
    its type and dimension, lists element-wise, numbers and strings as they are."""
    if isinstance(value, ClosedFormFamily):
        return f"{type(value).__name__}(d={getattr(value, 'd', None)})"
    if isinstance(value, (list, tuple)):
        return [_setting(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _tensors(client: ClientLike) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(client, ClientSplit):
        return client.x_train, client.y_train
    return client[0], client[1]


class FederatedTrainer:
    """The rounds of every deep method: FedHB, its mixture, the engine versions of FedAvg
    / FedProx, the pooled reference and the personalised baselines.

    :meth:`step` runs one round through the package's round loop,
    :func:`~hbfl_pyro.rounds.federated_round` (the one :class:`~hbfl_pyro.FederatedSVI`
    runs too), its local work done by :attr:`round_engine`, a
    :class:`~hbfl_pyro.engines.deep.DeepEngine`. A method changes a step by overriding
    its hook::

        chosen  = self.select(round)                          # which clients take part
        replies = self.local_updates(round, chosen)           # their local training
        entries = self.aggregate_round(round, chosen, replies)  # the server update
        record  = {"round", "clients", **entries, "seconds"}  # appended to history

    - :meth:`select`: the package's one client selection
      (:func:`~hbfl_pyro.servers.base.select_indices`, seeded by ``(seed, round)``), the
      same for every method and for :class:`~hbfl_pyro.FederatedSVI`'s strategies;
    - :meth:`local_updates`: by default each chosen client starts where :meth:`starts`
      puts it and trains with :meth:`penalty` on its minibatches (seeded by
      ``(seed, round, client)``) with the configured engine; returns ``(C, d)``;
    - :meth:`aggregate_round`: by default :meth:`aggregate` (the server update from the
      clients' replies), whose dict of entries goes into the round's record.

    Subclasses define :meth:`penalty`, :meth:`aggregate` and :meth:`global_weights`, and
    name the attributes that hold their state between rounds in :attr:`STATE` (for
    :meth:`state_dict` / :meth:`load_state_dict`).

    **Messages** (methods with a server strategy, :class:`FedHB` and
    :class:`~hbfl_pyro.deep.FedHBMixture`): before local training each chosen client is
    sent :meth:`messages` (the strategy's ``message(round, client)``), and its local
    training reads only that message (where it starts, its prox, its minibatch seed). The
    message hooks in :attr:`hooks` (``on_message=``) see every message as the core's
    engines deliver it (:class:`~hbfl_pyro.engines.InProcessEngine`): ``hook("down",
    client, message)`` for each chosen client before any local training, then
    ``hook("up", client, reply)`` for each client whose local training returned (a reply
    with NaN or Inf included: the server's check comes after, as in the core; a client
    whose training raised sends nothing). The hook observes: its return value is ignored,
    and the messages are passed as sent, not copied, so a hook must not change them.

    **Failing clients** (the core's semantics, :mod:`hbfl_pyro.failures`): a chosen client
    whose local training raises, or whose reply holds NaN or Inf, is left out of the
    round's aggregate with a :class:`~hbfl_pyro.ClientFailureWarning`; the record's
    ``clients`` then lists the clients that replied, ``failed`` the others and ``errors``
    each one's reason (both keys only in rounds where a client failed). When the batched
    local training raises, every chosen client is trained alone to find the culprit(s);
    if all of them raise, the error is the code's, not a client's, and is raised. With
    fewer than ``min_clients`` good replies the server is not updated (``"updated":
    False`` in the record). A client that fails ``max_failures`` rounds in a row (rounds
    it was chosen for) stops the run with :class:`~hbfl_pyro.ClientFailureError` naming
    it. Methods whose replies are not per client (:class:`~hbfl_pyro.deep.Pooled`) set
    :attr:`PER_CLIENT` to ``False`` and run unguarded. Local training, vectorised
    included, is row-wise: a NaN in one client's row never reaches another's.

    :param net: the network; its current weights are the starting point ``m0``.
    :param clients: training clients, :class:`~hbfl_pyro.deep.data.ClientSplit` or
        ``(x_train, y_train)`` pairs.
    :param fraction: fraction of clients per round.
    :param local: the clients' :class:`~hbfl_pyro.deep.local.LocalSpec`.
    :param engine: ``"vectorised"`` (one batched computation per round) or
        ``"inprocess"`` (the clients one after another), the core's names; the former
        ``"vmap"`` / ``"loop"`` work for one release and warn.
    :param chunk_size: clients per vmapped chunk (``None``: all of a round at once).
    :param seed: seeds client selection (by round) and minibatches (by round and client).
    :param min_clients: fewest good replies for the server to update (as the core's).
    :param max_failures: rounds in a row a client may fail before the run stops naming it
        (the core's :data:`~hbfl_pyro.failures.MAX_FAILED_ROUNDS`).
    """

    #: Whether :meth:`local_updates` returns one reply per chosen client (rows of a tensor
    #: or of each tensor of a tuple): the failure handling applies to such replies.
    PER_CLIENT = True

    #: ``{state_dict key: attribute}``: what a method keeps between rounds, besides the
    #: round counter and the history (every other random choice derives from ``seed``).
    STATE: Dict[str, str] = {}

    #: The attributes holding a method's settings (numbers, strings, families by type):
    #: part of :meth:`fingerprint`, so a checkpoint is not resumed under other settings.
    SETTINGS: Tuple[str, ...] = ()

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        *,
        fraction: float = 1.0,
        local: Optional[LocalSpec] = None,
        engine: str = "vectorised",
        chunk_size: Optional[int] = None,
        seed: int = 0,
        min_clients: int = 1,
        max_failures: int = MAX_FAILED_ROUNDS,
    ):
        # The warning names the caller: the user's line, through the chain of __init__s
        # that led here (FedProx -> FedHB -> this one: each calls its parent's).
        inits = sum(
            "__init__" in vars(cls)
            for cls in type(self).__mro__
            if issubclass(cls, FederatedTrainer)
        )
        engine = engine_name(engine, stacklevel=2 + inits)
        flat = FlatNet(net)
        #: ``{parameter name: shape}`` of the network (for :meth:`fingerprint`).
        self.layout = {name: list(shape) for name, shape in zip(flat.names, flat.shapes)}
        #: The network as ``f(theta, x)`` (a :class:`~hbfl_pyro.deep.FlatNet`, or what a
        #: method predicts with, e.g. pFedBayes's mean-field predictive).
        self.net: WeightFunction = flat
        self.init = flat.vector()
        self.data = self.prepare(clients)
        self.sizes = [len(y) for _, y in self.data]
        self.fraction, self.seed, self.engine = fraction, seed, engine
        self.local = local if local is not None else LocalSpec()
        self.chunk_size = chunk_size
        per_round = max(1, int(round(fraction * self.num_clients)))
        if not 1 <= min_clients <= per_round:
            raise ValueError(
                f"min_clients must be between 1 and the {per_round} client(s) sampled per round "
                f"(fraction={fraction}, {self.num_clients} clients), got {min_clients}"
            )
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self.min_clients, self.max_failures = int(min_clients), int(max_failures)
        self.round = 0
        self.history: List[Dict] = []
        #: The message hooks (see the class doc; set by ``on_message=`` where a method has one).
        self.hooks: List[MessageHook] = []
        #: What runs a round's local work (:meth:`local_updates`) for the round loop: the
        #: messages down, the clients' training, the replies up and the failing clients
        #: found (:class:`~hbfl_pyro.engines.deep.DeepEngine`; :attr:`engine` names how
        #: the clients train, vectorised or one after another).
        self.round_engine = DeepEngine(self)

    @property
    def num_clients(self) -> int:
        return len(self.data)

    def prepare(self, clients: Sequence[ClientLike]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Clients' ``(x_train, y_train)`` on the network's device, ``x`` in its dtype."""
        dtype, device = self.init.dtype, self.init.device
        return [
            (x.to(dtype=dtype, device=device), y.to(device=device).long())
            for x, y in map(_tensors, clients)
        ]

    # ------------------------------------------------------------------ hooks
    def penalty(self) -> Penalty:
        raise NotImplementedError

    def aggregate(self, chosen: List[int], thetas) -> Dict:
        """The server update from the chosen clients' replies (what
        :meth:`local_updates` returned); returns the round record's entries."""
        raise NotImplementedError

    def global_weights(self) -> torch.Tensor:
        raise NotImplementedError

    def starts(self, clients: Sequence[int]) -> torch.Tensor:
        """Where the training clients ``clients`` start local training: ``(d,)`` (all at
        the global weights, the default) or ``(C, d)``."""
        return self.global_weights()

    def select(self, server_round: int) -> List[int]:
        """The round's clients (indices, sorted): :func:`~hbfl_pyro.deep.local.select_clients`."""
        return select_clients(self.num_clients, self.fraction, self.seed, server_round)

    def messages(self, server_round: int, chosen: List[int]) -> Dict[int, Dict]:
        """What each chosen client is sent this round, ``{client: message}``; ``{}`` (the
        default) for methods without a server strategy, whose clients read the trainer."""
        return {}

    def deliver(self, direction: str, client: int, message: Dict) -> Dict:
        """Pass a message through the hooks (see the class doc); returns it unchanged."""
        for hook in self.hooks:
            hook(direction, client, message)
        return message

    def received(self, server_round: int, chosen: Sequence[int]) -> Dict[int, Dict]:
        """The messages ``chosen`` were sent this round by :meth:`step` (built afresh, and
        not delivered, when :meth:`local_updates` is called outside a round)."""
        sent_round, sent = self.round_engine.sent
        if sent_round != server_round or any(i not in sent for i in chosen):
            sent = self.messages(server_round, list(chosen))
        return {i: sent[i] for i in chosen}

    def reply_message(self, server_round: int, client: int, parts: Tuple) -> Dict:
        """Client ``client``'s reply as the ``"up"`` message the hooks see: the round's
        reply parts of that client (:attr:`REPLY`: one name per part) with its name, the
        round and its number of examples (the core's reply metadata)."""
        reply: Dict[str, Any] = {
            "client": client,
            "round": server_round,
            "num_examples": self.sizes[client],
        }
        reply.update((name, part) for name, part in zip(self.REPLY, parts) if part is not None)
        return reply

    #: The names of a reply's parts in the ``"up"`` messages (:meth:`reply_message`).
    REPLY: Tuple[str, ...] = ("m",)

    def local_updates(self, server_round: int, chosen: List[int]):
        """The chosen clients' local training; returns their replies for
        :meth:`aggregate_round` (by default their final vectors ``(C, d)``)."""
        schedules = schedules_for(self.sizes, self.local, self.seed, server_round, chosen)
        data = [self.data[i] for i in chosen]
        return self.train(self.starts(chosen), data, schedules, self.penalty())

    def aggregate_round(self, server_round: int, chosen: List[int], replies) -> Dict:
        """The server's part of the round; returns the record's entries (by default
        :meth:`aggregate`)."""
        return self.aggregate(chosen, replies)

    # ------------------------------------------------------------------ training
    def train(
        self,
        starts: torch.Tensor,
        data: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        schedules,
        penalty: Penalty,
        spec: Optional[LocalSpec] = None,
    ) -> torch.Tensor:
        """Local training of ``data``'s clients with the configured engine."""
        spec = spec or self.local
        if self.engine == "inprocess":
            return train_loop(self.net, starts, data, schedules, spec, penalty)
        return train_vmap(self.net, starts, data, schedules, spec, penalty, self.chunk_size)

    def step(self) -> Dict:
        """One round (select, local updates, aggregate, record; see the class doc) through
        :func:`~hbfl_pyro.rounds.federated_round`; returns its record (round, clients, the
        method's entries, seconds; ``failed`` and ``errors`` when a client failed,
        ``updated`` when the server was not).

        :raises ClientFailureError: when a client has failed ``max_failures`` rounds in a
            row (the round is recorded first, as the core's)."""
        return federated_round(
            self,
            self.select,
            self._outbox,
            self.round_engine,
            self._record,
            # Judged in rounds where a client failed only (see FailureRule.every_round).
            FailureRule(self.max_failures, DEEP_REMEDY, every_round=False),
        )

    def _outbox(self, server_round: int, chosen: List[int]) -> Dict[int, Optional[Dict]]:
        """The round's :meth:`messages` for the engine: every chosen client, ``None`` for
        those the method sends nothing (its clients read the trainer)."""
        return {**dict.fromkeys(chosen), **self.messages(server_round, chosen)}

    def _record(
        self, server_round: int, chosen: List[int], replies, failures: Dict[int, str]
    ) -> Dict:
        """The round's record: ``round``, ``clients`` (those that replied), ``failed`` and
        ``errors`` when a client failed, then :meth:`aggregate_round`'s entries if at least
        ``min_clients`` replied (else ``"updated": False``, with a warning)."""
        record: Dict = {"round": server_round, "clients": chosen}
        if failures:
            chosen = [i for i in chosen if i not in failures]
            record["clients"] = chosen
            record["failed"] = sorted(failures)
            record["errors"] = {i: failures[i] for i in sorted(failures)}
        if len(chosen) >= self.min_clients:
            record.update(self.aggregate_round(server_round, chosen, replies))
        else:
            warnings.warn(
                f"round {server_round}: only {len(chosen)} good replies (min_clients="
                f"{self.min_clients}); the global model is not updated this round",
                ClientFailureWarning,
                stacklevel=4,  # _record <- federated_round <- step <- the caller of step
            )
            record["updated"] = False
        return record

    def guarded_updates(self, server_round: int, chosen: List[int]) -> Tuple[Any, Dict[int, str]]:
        """:meth:`local_updates` with the core's failure handling
        (:meth:`DeepEngine.guard <hbfl_pyro.engines.deep.DeepEngine.guard>`, what
        :meth:`step` runs): returns the good clients' replies (those of ``chosen`` not
        failed, in order) and ``{client: reason}`` for the failed ones. Replies are
        untouched when none failed."""
        return self.round_engine.guard(server_round, chosen, stacklevel=3)

    def run(self, rounds: int) -> List[Dict]:
        """Run ``rounds`` (more) rounds; returns the whole history."""
        for _ in range(rounds):
            self.step()
        return self.history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """A snapshot of the run between rounds: the round, the history and the method's
        :attr:`STATE` (copies). Loaded into a trainer built with the same arguments
        (:meth:`load_state_dict`), the rest of the run equals the uninterrupted one bit
        for bit: selection, minibatches and every other random draw derive from
        ``(seed, round, ...)``. (The mixture adds its gating network:
        :meth:`FedHBMixture.state_dict <hbfl_pyro.deep.FedHBMixture.state_dict>`.)"""
        state = {"trainer": type(self).__name__, "round": self.round}
        state.update({key: _copy(getattr(self, attr)) for key, attr in self.STATE.items()})
        state["history"] = _copy(self.history)
        return state

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a :meth:`state_dict` of a trainer of the same class and arguments."""
        expected = {"trainer", "round", "history", *self.STATE}
        if state.get("trainer") != type(self).__name__ or set(state) != expected:
            raise ValueError(
                f"not a {type(self).__name__} state: got trainer {state.get('trainer')!r} "
                f"with keys {sorted(state)}, expected {sorted(expected)}"
            )
        for key, attr in self.STATE.items():
            setattr(self, attr, _copy(state[key]))
        self.round = int(state["round"])
        self.history = _copy(state["history"])

    # ------------------------------------------------------------------ checkpoint files
    def fingerprint(self) -> Dict:
        """What a checkpoint must match to be resumed by this trainer (plain values, the
        same on every machine): the trainer, the network's parameter names and shapes, the
        weights' dtype, the clients (their number and training-set sizes), the seed, the
        fraction, the local spec and the method's :attr:`SETTINGS`. Like
        :meth:`~hbfl_pyro.FederatedSVI.fingerprint`, it leaves out what does not change the
        state's meaning (the engine, ``chunk_size``, the failure options)."""
        return {
            "trainer": type(self).__name__,
            "network": dict(self.layout),
            "dtype": str(self.init.dtype),
            "clients": self.num_clients,
            "client sizes": list(self.sizes),
            "seed": self.seed,
            "fraction": float(self.fraction),
            "local": dict(self.local.__dict__),
            "settings": {name: _setting(getattr(self, name)) for name in self.SETTINGS},
        }

    def checkpoint(self, path) -> None:
        """Write :meth:`state_dict` to ``path``, atomically, with :meth:`fingerprint`
        (:func:`hbfl_pyro.checkpoint.save_checkpoint`)."""
        save_checkpoint(self.state_dict(), path, self.fingerprint())

    def resume(self, path) -> None:
        """Load a state written by :meth:`checkpoint` (or ``save_checkpoint(trainer.
        state_dict(), path, trainer.fingerprint())``); the next round continues the run,
        bit for bit as if uninterrupted. The file is read without unpickling code and
        refused with a :class:`~hbfl_pyro.checkpoint.CheckpointError` if it is corrupt, of
        a newer format, or of another trainer, network, clients or settings (naming what
        differs); a refused checkpoint changes nothing."""
        self.load_state_dict(load_checkpoint(path, self.fingerprint()))

    def finetune_plan(
        self, data: Sequence[ClientLike], epochs: int, tag: str, **spec_changes
    ) -> Tuple[LocalSpec, List[Tuple[torch.Tensor, torch.Tensor]], List]:
        """What every method's :meth:`finetune` shares: the local spec run for ``epochs``
        epochs (with ``spec_changes``, e.g. another ``lr``), ``data`` on the network's
        device, and each client's minibatches, seeded by ``(seed, tag, client)`` so that
        every method fine-tunes on the same batches."""
        spec = LocalSpec(**{**self.local.__dict__, "epochs": epochs, **spec_changes})
        data = self.prepare(data)
        sizes = [len(y) for _, y in data]
        return spec, data, schedules_for(sizes, spec, self.seed, tag, range(len(data)))

    def finetune(
        self,
        data: Sequence[ClientLike],
        epochs: int,
        tag: str = "finetune",
        clients: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Personalise (method.md §7): each client of ``data`` starts at the global weights
        (or, for training clients named by ``clients``, where :meth:`starts` puts them) and
        trains ``epochs`` epochs on its own data with the method's penalty.

        :param clients: the indices of ``data``'s clients among the training clients, or
            ``None`` for new clients.
        :returns: the personalised vectors ``(C, d)``.
        """
        spec, data, schedules = self.finetune_plan(data, epochs, tag)
        starts = self.global_weights() if clients is None else self.starts(list(clients))
        return self.train(starts, data, schedules, self.penalty(), spec)


def _spread(sums: Params, eps: float) -> float:
    """The weighted mean per-coordinate variance of the summed ``m_i`` (a diagnostic),
    from the sums alone: ``(sum_mm - d eps^2 sum_w) / (d sum_w) - ||mean||^2 / d``."""
    total = sums["count"]
    mean = sums["sum_m"] / total
    d = mean.shape[-1]
    sum_mm = sums["sum_mm"]
    second = (sum_mm.diagonal() if sum_mm.dim() == 2 else sum_mm).sum() / total - d * eps**2
    return float((second - mean.dot(mean)) / d)


def weighted_sum(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i rows_i`` as one contraction (no ``(C, d)`` temporary)."""
    return torch.tensordot(w, rows, dims=1)


class FedHB(FederatedTrainer):
    """FedHB for a network (see the module docstring).

    :param net: the network; its initial weights should be the family's ``mu0``
        (:func:`iso_prior` / :func:`diag_prior` take them).
    :param clients: the training clients.
    :param family: a closed-form family of dimension ``d`` (``NIWIso``, ``NIWDiag``,
        ``NIWFull`` for tiny networks).
    :param eps: the fixed scale of ``q_i = N(m_i, eps^2 I)``; enters the server's ``b``
        (``eps^2`` per coordinate and client), so ``1 / eps^2`` caps the learned prox weight.
    :param participation: ``"scaled"`` or ``"stale"``.
    :param weighting: ``"equal"`` or ``"size"``.
    :param start: ``"global"`` (every round's local training starts at ``m0``, as FedAvg)
        or ``"own"`` (a client resumes its own ``m_i``; personalisation fine-tunes from it).
    :param on_message: a hook ``(direction, client, message)`` called with every message,
        as the core's ``FederatedSVI(on_message=...)`` (see :class:`FederatedTrainer`):
        ``"down"`` with the server's message (``round``, ``mode``, ``seed``,
        ``family_params``), ``"up"`` with the reply (``client``, ``round``,
        ``num_examples``, ``m``: the client's ``m_i``).
    :param dp: a :class:`~hbfl_pyro.dp.DPConfig`: client-level differential privacy
        (:class:`~hbfl_pyro.servers.FamilyDifferentialPrivacy` wraps the server; each
        client's update ``m_i - m0`` is clipped to ``dp.clip``, Gaussian noise goes on each
        round's sums, and every record reports ``epsilon`` and ``delta``). Needs
        ``participation="scaled"`` and an ``NIWIso``, ``NIWDiag`` or
        :class:`FedProxFamily` family (the last: DP-FedAvg / DP-FedProx); with
        ``start="own"`` a client resumes from the clipped reply it sent.
    :param kwargs: ``fraction``, ``local``, ``engine``, ``chunk_size``, ``seed`` of
        :class:`FederatedTrainer`.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import FedHB, FlatNet, LocalSpec, iso_prior, mlp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = mlp((4, 8, 3))
        >>> clients = [(torch.randn(20, 4), torch.randint(0, 3, (20,))) for _ in range(5)]
        >>> fit = FedHB(net, clients, iso_prior(FlatNet(net).vector()), fraction=0.6,
        ...             local=LocalSpec(epochs=2, batch_size=8, lr=0.1), eps=0.05)
        >>> history = fit.run(3)
        >>> [r["clients"] for r in history]
        [[1, 2, 3], [0, 1, 2], [1, 3, 4]]
        >>> fit.global_weights().shape
        torch.Size([67])
    """

    STATE = {"server": "server_state", "own": "_own"}
    SETTINGS: Tuple[str, ...] = ("family", "eps", "participation", "weighting", "start")

    server: Union[FamilyServer, FamilyDifferentialPrivacy]

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        family: ClosedFormFamily,
        *,
        eps: float = 0.0,
        participation: str = "scaled",
        weighting: str = "equal",
        start: str = "global",
        on_message: Optional[MessageHook] = None,
        dp: Optional[DPConfig] = None,
        **kwargs,
    ):
        super().__init__(net, clients, **kwargs)
        if start not in ("global", "own"):
            raise ValueError(f"start must be 'global' or 'own', got {start!r}")
        check_participation(participation)
        d = getattr(family, "d", self.net.d)  # the NIW families' dimension
        if d != self.net.d:
            raise ValueError(f"the family has d = {d}, the network {self.net.d} weights")
        if on_message is not None and not callable(on_message):
            raise TypeError(
                f"on_message must be a callable (direction, client, message), got "
                f"{type(on_message).__name__}"
            )
        #: The server strategy: q(phi), participation, weighting and the update are its;
        #: FedAvg, FedProx and FedHB differ only by its family.
        self.server = FamilyServer(
            family,
            range(self.num_clients),
            eps=eps,
            participation=participation,
            weighting=weighting,
            sizes=self.sizes,
            fraction=self.fraction,
            min_clients=self.min_clients,
            seed=self.seed,
        )
        if dp is not None:
            # Differential privacy wraps the server, as FederatedSVI(dp=...) does the core's.
            self.server = FamilyDifferentialPrivacy(self.server, dp)
        #: The :class:`~hbfl_pyro.dp.DPConfig` (``None``: no differential privacy).
        self.dp = dp
        self.hooks = [on_message] if on_message is not None else []
        self.start = start
        self._own: Dict[int, torch.Tensor] = {}

    # The settings are the server's; read here for the fingerprint and the docs' spelling.
    @property
    def family(self) -> ClosedFormFamily:
        return self.server.family

    @property
    def eps(self) -> float:
        return self.server.eps

    @property
    def participation(self) -> str:
        return self.server.participation

    @property
    def weighting(self) -> str:
        return self.server.weighting

    @property
    def params(self) -> Params:
        """``q(phi)``'s parameters (the server's ``family_params``)."""
        return self.server.family_params

    @params.setter
    def params(self, value: Params) -> None:
        self.server.family_params = value

    @property
    def server_state(self) -> Dict:
        """The server's :meth:`~hbfl_pyro.servers.closed_form.FamilyServer.state_dict`
        (what :meth:`state_dict` keeps under ``"server"``)."""
        return self.server.state_dict()

    @server_state.setter
    def server_state(self, state: Dict) -> None:
        self.server.load_state_dict(state)

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a :meth:`state_dict`; a state of the former layout (``params`` and
        ``stale`` at the top, before the server strategy held them) is read too."""
        if "params" in state and "server" not in state:
            state = dict(state)
            server = {"mode": self.server.mode, "family_params": state.pop("params")}
            server["stale"] = state.pop("stale", {})
            state["server"] = server
        super().load_state_dict(state)

    def select(self, server_round: int) -> List[int]:
        """The server's selection (:meth:`~hbfl_pyro.servers.ServerStrategy.select`, the
        same clients as every other trainer's)."""
        return [int(i) for i in self.server.select(server_round)]

    def step(self) -> Dict:
        """:meth:`FederatedTrainer.step`; under ``dp=`` a round past a ``target_epsilon``
        budget is refused before any client trains (as the core's)."""
        if self.dp is not None:
            self.dp.check_round(self.round + 1)
        return super().step()

    def messages(self, server_round: int, chosen: List[int]) -> Dict[int, Dict]:
        """The server's message to each chosen client
        (:meth:`FamilyServer.message <hbfl_pyro.servers.closed_form.FamilyServer.message>`:
        the round, the mode, the client's seed and ``q(phi)``'s parameters)."""
        return {i: self.server.message(server_round, i) for i in chosen}

    def local_updates(self, server_round: int, chosen: List[int]) -> torch.Tensor:
        """Each chosen client trains from its message alone: it starts at the message's
        ``m0`` (or its own ``m_i``, ``start="own"``), its prox is the message's ``q(phi)``
        and its minibatches are seeded by the message's seed; under ``dp=`` it clips its
        update about that ``m0`` before replying. Returns the replies ``(C, d)``."""
        sent = self.received(server_round, chosen)
        # Every message of a round carries the same q(phi) (only the seeds differ), so the
        # batched training reads the first one's, as the core's VectorisedEngine does.
        params = sent[chosen[0]]["family_params"]
        spec = self.local
        schedules = [
            batch_schedule(self.sizes[i], spec.batch_size, spec.epochs, sent[i]["seed"])
            for i in chosen
        ]
        data = [self.data[i] for i in chosen]
        thetas = self.train(
            self.starts(chosen, params["m0"]), data, schedules, self.penalty(params)
        )
        if isinstance(self.server, FamilyDifferentialPrivacy):
            thetas = self.server.clip_updates(thetas, params["m0"])
        return thetas

    def penalty(self, params: Optional[Params] = None) -> Penalty:
        """``-E_q(phi)[log p(theta | phi)]`` under ``q(phi)`` (the current one by default)."""
        params = self.params if params is None else params
        family = self.family
        if isinstance(family, FedProxFamily):
            return family.client_penalty(params)
        if isinstance(family, (NIWIso, NIWDiag)):
            # A quadratic with precision a / b around m0: the engines add its gradient in
            # place. The constant makes the value -expected_log_prior exactly.
            center = params["m0"]
            # (Computed only if the value is asked for: the engines need the gradient.)
            return QuadraticPenalty(
                center,
                params["a"] / params["b"],
                constant=lambda: -family.expected_log_prior(center, params),
            )

        def penalty(theta, n):
            return -family.expected_log_prior(theta, params)

        return penalty

    def global_weights(self) -> torch.Tensor:
        """``m0``, the posterior mean of ``mu`` (the global model, method.md §7)."""
        return self.params["m0"]

    def starts(self, clients: Sequence[int], m0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``start="global"``: ``m0`` for everyone. ``start="own"``: each client resumes
        its own ``m_i`` (its variational parameters persist between rounds, as in
        block-coordinate VI), ``m0`` until it has taken part once.

        :param m0: the global mean the clients were sent (default: the current one)."""
        m0 = self.global_weights() if m0 is None else m0
        if self.start == "global":
            return m0
        return torch.stack([self._own.get(i, m0) for i in clients])

    def prox_weight(self) -> float:
        """The mean over coordinates of the current prox weight (summed-NLL scale; for
        :class:`FedProxFamily`, whose weight is ``mu n_i`` per client, the mean over the
        clients, ``mu`` times their mean size)."""
        if isinstance(self.family, FedProxFamily):
            return self.family.mu * sum(self.sizes) / len(self.sizes)
        return float(prox_weight(self.family, self.params).mean())

    def aggregate(self, chosen: List[int], thetas: torch.Tensor) -> Dict:
        """Hand the server the weighted sums of the client summaries; it sets ``q(phi)``
        to the server block's optimum (:meth:`FamilyServer.aggregate_sum
        <hbfl_pyro.servers.closed_form.FamilyServer.aggregate_sum>`).

        The server pools the replies (``"stale"`` keeps every client's latest ``m_i``, from
        which its summary is recomputed: it depends on ``m_i`` and ``eps`` only) and gives
        each its multiplicity; the sums come from ``family.weighted_summary_sums`` over
        blocks of clients, taken from ``thetas`` in place when the pool is the round's
        (no per-client copies of the ``d``-dimensional summaries).
        """
        server = self.server
        stale = self.participation == "stale"
        replies = {i: theta.clone() if stale else theta for i, theta in zip(chosen, thetas)}
        pooled = server.pool(replies)
        pool = sorted(pooled)
        if pool == list(chosen):  # the round's own replies, in order: no copies

            def rows(s):
                return thetas[s : s + BLOCK]

        else:

            def rows(s):
                return torch.stack([pooled[i] for i in pool[s : s + BLOCK]])

        w = server.multiplicities(pool, thetas)
        entries: Dict[str, Any] = {}
        if isinstance(server, FamilyDifferentialPrivacy):
            # The wrapper re-clips, sums and adds the noise; the spread is read from its
            # noisy sums (the clean ones are not released).
            record, sums = server.aggregate_rows(self.round + 1, pool, rows, w)
            entries = {"epsilon": record["epsilon"], "delta": record["delta"]}
        else:
            sums = summed_summaries(self.family, w, rows, len(pool), self.eps)
            total = {f"stats/{k}": v for k, v in sums.items()}
            server.aggregate_sum(self.round + 1, total, pool)
        if self.start == "own":
            self._own.update(zip(chosen, thetas))
        return {**self.diagnostics(sums), **entries}

    def diagnostics(self, sums: Params) -> Dict:
        """The round record's view of the update: the learned prox weight and the clients'
        spread (from the sums the update read). None for :class:`FedProxFamily`, whose
        prox is fixed and whose sums hold no second moments (FedAvg's and FedProx's
        records have never had these entries)."""
        if isinstance(self.family, FedProxFamily):
            return {}
        return {"prox_weight": self.prox_weight(), "client_spread": _spread(sums, self.eps)}

    @property
    def privacy(self) -> Optional[Dict]:
        """The privacy of the rounds so far (:meth:`hbfl_pyro.dp.DPConfig.report`), or
        ``None`` without ``dp=``."""
        if isinstance(self.server, FamilyDifferentialPrivacy):
            return self.server.report()
        return None


# --------------------------------------------------------------------------------------
# The same hierarchy as a Pyro model
# --------------------------------------------------------------------------------------


def client_objective(
    net: FlatNet,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    family: ClosedFormFamily,
    params: Params,
) -> torch.Tensor:
    """A client's full-data objective ``L_i(theta) = -sum_j log p(y_j | x_j, theta)
    - E_q(phi)[log p(theta | phi)]``: minus its ELBO block with ``q_i`` a point mass."""
    logits = net(theta, x)
    nll = -dist.Categorical(logits=logits).log_prob(y).sum()
    return nll - family.expected_log_prior(theta, params)


def network_model(net: FlatNet, family: ClosedFormFamily) -> Callable:
    """The FedHB hierarchy as an ordinary Pyro model for :class:`~hbfl_pyro.FederatedSVI`
    and plain Pyro (data collated by :mod:`hbfl_pyro.data`: ``x`` ``(C, n, ...)``,
    ``y`` ``(C, n)``, ``mask``)::

        phi     ~ p(phi)                                 family.sample_global()
        theta_i ~ p(theta | phi), i in the clients plate family.sample_local(phi)
        y_ij    ~ Categorical(logits = net(theta_i, x_ij))

    Example::

        >>> import torch
        >>> from hbfl_pyro import FederatedSVI
        >>> from hbfl_pyro.deep import mlp
        >>> from pyro.infer.autoguide import AutoDelta
        >>> net = FlatNet(mlp((2, 3, 2)))
        >>> fam = diag_prior(net.vector(), pseudo_clients=4.0)
        >>> clients = {f"c{i}": {"x": torch.randn(6, 2), "y": torch.randint(0, 2, (6,))}
        ...            for i in range(3)}
        >>> fit = FederatedSVI(network_model(net, fam), clients, server=fam,
        ...                    local_guide=AutoDelta, local_steps=2)
        >>> fit.structure.global_sites, fit.structure.local_sites
        (('sigma2', 'mu'), ('theta',))
    """

    def model(data):
        phi = family.sample_global()
        x, y, mask = data["x"], data["y"], data["mask"]
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = family.sample_local(phi)  # (C, 1, d): one weight vector per client
            # One network per client: vmap over the clients' weight vectors and inputs,
            # and over any particle dims left of the plate (theta: (..., C, 1, d)).
            lead, count = theta.shape[:-3], theta.shape[-3]
            flat = theta.reshape((-1, count, net.d))
            logits = vmap(vmap(net), in_dims=(0, None))(flat, x)  # (P, C, n, classes)
            logits = logits.reshape(lead + logits.shape[1:])
            with pyro.plate("obs", y.shape[-1], dim=-1), poutine.mask(mask=mask):
                pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    return model
