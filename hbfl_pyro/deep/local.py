"""Local training of many clients: a Python loop (the reference) and one vmapped computation.

A client ``i`` holding ``n_i`` training examples minimises, from a start vector (the
global mean ``m0`` in FedHB, FedAvg and FedProx), by minibatch SGD or Adam::

    L_i(theta) = (n_i / |B|) sum_{b in B} CE(f(theta, x_b), y_b) + penalty(theta)

the minibatch estimate of the *summed* negative log-likelihood plus a penalty (FedHB:
``-E_q(phi)[log p(theta | phi)]``, the learned Mahalanobis prox; FedProx: ``mu/2 ||.||^2``;
FedAvg: none). With ``normalise=True`` (the default) the optimiser sees ``L_i / n_i``:
the same minimiser, but step sizes then mean what they mean for FedAvg's mean-loss SGD,
so one learning rate serves every method and client size.

:func:`train_loop` (the trainers' ``engine="inprocess"``) runs clients one after another
with ``torch.optim``; :func:`train_vmap` (``engine="vectorised"``) runs them as one batched
computation — ``torch.func.vmap`` of ``torch.func.grad`` over the stacked client
vectors, each client's minibatches gathered from its padded data, clients that have run
out of minibatches sitting out the later steps, and the optimiser applied row-wise with
each client's own step count. Both consume
the same :func:`batch_schedule`, so they compute the same updates (tested to round-off).
Both run on the device of the start vectors (CUDA included); a
:class:`QuadraticPenalty` has its gradient added in place rather than through autograd.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ..seeding import derive_seed
from ..servers.base import select_indices
from .nets import WeightFunction

__all__ = [
    "ENGINES",
    "LEGACY_ENGINES",
    "LocalSpec",
    "QuadraticPenalty",
    "batch_schedule",
    "client_loss",
    "engine_name",
    "select_clients",
    "train_loop",
    "train_vmap",
]

#: The engines' names, the core's (:class:`~hbfl_pyro.FederatedSVI`'s ``engine``):
#: ``"inprocess"`` runs the clients one after another (:func:`train_loop`, the reference),
#: ``"vectorised"`` as one batched computation (:func:`train_vmap`).
ENGINES = ("inprocess", "vectorised")

#: The deep trainers' former engine names (deprecated, one release) and their new ones.
LEGACY_ENGINES: Dict[str, str] = {"loop": "inprocess", "vmap": "vectorised"}


def engine_name(engine: str, stacklevel: int = 3) -> str:
    """``engine`` in the core's vocabulary (:data:`ENGINES`). The former names ``"loop"``
    and ``"vmap"`` still work for one release and warn (``DeprecationWarning``).

    Example::

        >>> engine_name("vectorised")
        'vectorised'
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     name = engine_name("loop")
        >>> name, caught[0].category.__name__
        ('inprocess', 'DeprecationWarning')
    """
    if engine in LEGACY_ENGINES:
        new = LEGACY_ENGINES[engine]
        warnings.warn(
            f'engine="{engine}" is deprecated: use engine="{new}" (the core\'s engine names)',
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    if engine not in ENGINES:
        raise ValueError(
            f"engine must be 'inprocess' or 'vectorised' (formerly 'loop' / 'vmap'), got {engine!r}"
        )
    return engine


#: ``penalty(theta, n_i) -> scalar``: added to the client's summed NLL (``n_i`` lets a
#: penalty stated per example, like FedProx's, be scaled to the summed objective).
Penalty = Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
ClientTensors = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class LocalSpec:
    """How a client trains locally.

    :ivar epochs: passes over the client's training data per round.
    :ivar batch_size: minibatch size (the last batch of an epoch may be smaller).
    :ivar lr: step size.
    :ivar optimizer: ``"sgd"`` or ``"adam"`` (fresh state every round, as in FedAvg).
    :ivar momentum: SGD momentum (0: plain SGD).
    :ivar normalise: divide the objective by ``n_i`` (see the module docstring).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    normalise: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


def select_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> List[int]:
    """The clients of a round: ``round(fraction * N)`` of them (at least one), sorted,
    seeded by ``(seed, round)`` only, so every method of a comparison sees the same ones.

    The package's one selection, :func:`hbfl_pyro.servers.base.select_indices` (what
    :meth:`~hbfl_pyro.servers.ServerStrategy.select` draws too), with ``fraction`` checked.

    Example::

        >>> select_clients(10, 0.3, seed=0, server_round=1) == select_clients(10, 0.3, 0, 1)
        True
        >>> len(select_clients(10, 0.3, 0, 1)), select_clients(4, 1.0, 0, 1)
        (3, [0, 1, 2, 3])
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return select_indices(num_clients, fraction, seed, server_round)


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> List[torch.Tensor]:
    """Minibatch indices for ``epochs`` shuffled passes over ``n`` examples.

    Example::

        >>> [b.tolist() for b in batch_schedule(5, 2, 1, seed=3)]  # doctest: +SKIP
        [[4, 0], [2, 1], [3]]
        >>> sorted(torch.cat(batch_schedule(5, 2, 1, seed=3)).tolist())
        [0, 1, 2, 3, 4]
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        out.extend(torch.randperm(n, generator=gen).split(batch_size))
    return out


def client_loss(
    net: WeightFunction,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    n,
    penalty: Penalty = None,
    normalise: bool = True,
) -> torch.Tensor:
    """One minibatch's estimate of ``L_i(theta)`` (or ``L_i / n_i``).

    :param mask: 1 for the batch's real rows, 0 for padding (vmapped batches are padded).
    :param n: the client's number of training examples ``n_i`` (a number or 0-d tensor).
    """
    ce = F.cross_entropy(net(theta, x), y, reduction="none")
    # n_i / |B|: the minibatch sum scaled to the full local data (clamped: a fully padded
    # step of a finished client must stay finite; its update is masked out anyway).
    nll = (ce * mask).sum() * (n / mask.sum().clamp(min=1))
    total = nll if penalty is None else nll + penalty(theta, n)
    return total / n if normalise else total


class QuadraticPenalty:
    """``penalty(theta, n) = 0.5 sum_k w_k (theta_k - c_k)^2 (* n if per_example) + constant``.

    The prox terms of FedHB (iso / diag families: ``w = a / b``, ``c = m0``) and of FedProx
    (``w = mu`` per example) have this form. Called, it is an ordinary differentiable
    penalty; the engines (:func:`train_loop`, :func:`train_vmap`) recognise it and add its
    gradient ``w (theta - c)`` in place instead of differentiating it: with many clients
    stacked, autograd's chain of element-wise passes over ``(C, d)`` arrays costs more than
    the network's own forward and backward. Tested equal to the autograd path.

    :param center: ``c``, shape ``(d,)``.
    :param precision: ``w``, a scalar or shape ``(d,)``.
    :param per_example: multiply by the client's ``n_i`` (a penalty stated per example).
    :param constant: added to the value (no gradient); a callable is called the first
        time the value is needed (the engines need only the gradient).
    """

    def __init__(self, center, precision, per_example: bool = False, constant=0.0):
        self.center = center
        self.precision = torch.as_tensor(precision, dtype=center.dtype, device=center.device)
        self.per_example = per_example
        self._constant = constant
        self._buffer: Optional[torch.Tensor] = None

    @property
    def constant(self):
        if callable(self._constant):
            self._constant = self._constant()
        return self._constant

    def __call__(self, theta: torch.Tensor, n) -> torch.Tensor:
        value = 0.5 * (self.precision * (theta - self.center).pow(2)).sum(-1)
        return (value * n if self.per_example else value) + self.constant

    def add_grad_(
        self, g: torch.Tensor, theta: torch.Tensor, n: torch.Tensor, normalise: bool
    ) -> None:
        """``g += s_i w (theta - c)`` in place, for ``g`` and ``theta`` of shape ``(C, d)``
        and the clients' sizes ``n`` ``(C,)``: ``s_i`` is the objective's factor (``1 / n_i``
        when normalised) times ``n_i`` for a per-example penalty."""
        scale = 1.0 / n if normalise else torch.ones_like(n)
        if self.per_example:
            scale = scale * n
        # A reused buffer: a fresh (C, d) temporary every step costs page faults that can
        # exceed the arithmetic.
        buf = self._buffer
        if buf is None or buf.shape != theta.shape or buf.dtype != theta.dtype:
            buf = self._buffer = torch.empty_like(theta)
        torch.sub(theta, self.center, out=buf)
        if self.precision.dim():
            buf.mul_(self.precision)
            g.addcmul_(buf, scale[:, None])
        else:
            g.addcmul_(buf, (scale * self.precision)[:, None])


def _split_penalty(penalty: Penalty):
    """``(penalty for autograd, quadratic handled in place)``: one of them is ``None``."""
    if isinstance(penalty, QuadraticPenalty):
        return None, penalty
    return penalty, None


def _torch_optimizer(params, spec: LocalSpec):
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)


def _starts(starts: torch.Tensor, count: int) -> torch.Tensor:
    return starts.expand(count, -1) if starts.dim() == 1 else starts


def train_loop(
    net: WeightFunction,
    starts: torch.Tensor,
    data: Sequence[ClientTensors],
    schedules: Sequence[Sequence[torch.Tensor]],
    spec: LocalSpec,
    penalty: Penalty = None,
) -> torch.Tensor:
    """Train clients one at a time (the reference for :func:`train_vmap`).

    :param starts: ``(d,)`` (every client starts there) or ``(C, d)``.
    :param data: each client's ``(x_train, y_train)``.
    :param schedules: each client's minibatch indices (:func:`batch_schedule`).
    :returns: the clients' final vectors, ``(C, d)``.
    """
    starts = _starts(starts, len(data))
    penalty, quad = _split_penalty(penalty)
    out = []
    for start, (x, y), batches in zip(starts, data, schedules):
        theta = start.detach().clone().requires_grad_(True)
        optim = _torch_optimizer([theta], spec)
        n = torch.tensor(float(len(y)), dtype=theta.dtype, device=theta.device)
        for idx in batches:
            optim.zero_grad()
            xb, yb = x[idx], y[idx]
            mask = torch.ones(len(idx), dtype=theta.dtype, device=theta.device)
            loss = client_loss(net, theta, xb, yb, mask, n, penalty, spec.normalise)
            loss.backward()
            if quad is not None:
                quad.add_grad_(theta.grad[None], theta.detach()[None], n[None], spec.normalise)
            optim.step()
        out.append(theta.detach())
    return torch.stack(out) if out else starts.new_zeros((0, net.d))


def _pad_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack along a new first axis, padding the first dim with each tensor's first row."""
    longest = max(t.shape[0] for t in tensors)
    rows = []
    for t in tensors:
        if t.shape[0] < longest:
            t = torch.cat([t, t[:1].expand((longest - t.shape[0],) + tuple(t.shape[1:]))])
        rows.append(t)
    return torch.stack(rows)


class _RowOptimizer:
    """SGD (with momentum) or Adam on a ``(C, d)`` stack, one row per client.

    Follows ``torch.optim.SGD`` / ``torch.optim.Adam`` (defaults: betas 0.9, 0.999,
    eps 1e-8, no weight decay) step for step. :meth:`step` updates the rows ``rows`` only
    (all when ``None``), so a client that has run out of minibatches keeps its parameters
    and its state. Updates are in place: at ``C d`` in the millions, every temporary of
    that size costs as much as a small network's forward pass.

    Why not ``torch.optim``: its optimisers keep one step count per parameter tensor, and
    Adam's bias correction reads it; here each row (client) has its own count, since
    clients of unequal sizes run out of minibatches at different steps. One
    ``torch.optim.Adam`` per row would restore that at a Python loop over the clients
    per step, which the vectorised engine exists to avoid. ``tests/test_deep_fedhb.py``
    checks this class against ``torch.optim`` (the loop engine) to float error.
    """

    def __init__(self, theta: torch.Tensor, spec: LocalSpec):
        self.spec = spec
        self.steps = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
        self.m = torch.zeros_like(theta) if spec.optimizer == "adam" or spec.momentum else None
        self.v = torch.zeros_like(theta) if spec.optimizer == "adam" else None

    def step(self, theta: torch.Tensor, g: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
        if rows is None:
            self._update(theta, g, self.steps, self.m, self.v)
            return
        # Work on the active rows' copies, then write them back.
        parts = [t[rows] if t is not None else None for t in (theta, self.steps, self.m, self.v)]
        self._update(parts[0], g, *parts[1:])
        for full, part in zip((theta, self.steps, self.m, self.v), parts):
            if full is not None and part is not None:  # both or neither
                full[rows] = part

    def _update(self, theta, g, steps, m, v) -> None:
        spec = self.spec
        if spec.optimizer == "sgd":
            if spec.momentum:
                # torch: the buffer starts as the first gradient, then buf = momentum buf + g.
                first = (steps == 0)[:, None]
                m.copy_(torch.where(first, g, m.mul_(spec.momentum).add_(g)))
                g = m
            steps.add_(1)
            theta.add_(g, alpha=-spec.lr)
            return
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        steps.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = (spec.lr / (1 - beta1 ** steps[:, None])).neg_()
        denom = (v.sqrt() / (1 - beta2 ** steps[:, None]).sqrt()).add_(eps)
        theta.addcdiv_(m * step_size, denom)


def train_vmap(
    net: WeightFunction,
    starts: torch.Tensor,
    data: Sequence[ClientTensors],
    schedules: Sequence[Sequence[torch.Tensor]],
    spec: LocalSpec,
    penalty: Penalty = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Train clients as one batched computation (``vmap`` over the stacked client vectors).

    Same arguments and result as :func:`train_loop`. ``chunk_size`` runs the clients in
    consecutive groups of that size (to bound memory); ``None`` runs all at once.
    """
    count = len(data)
    starts = _starts(starts, count)
    if count == 0:
        return starts.new_zeros((0, net.d))
    size = count if chunk_size is None else max(1, int(chunk_size))
    if size < count:
        parts = [
            train_vmap(
                net,
                starts[i : i + size],
                data[i : i + size],
                schedules[i : i + size],
                spec,
                penalty,
            )
            for i in range(0, count, size)
        ]
        return torch.cat(parts)
    dtype, device = starts.dtype, starts.device
    x = _pad_stack([d[0] for d in data])
    y = _pad_stack([d[1] for d in data])
    n = torch.tensor([float(len(d[1])) for d in data], dtype=dtype, device=device)
    num_steps = max(len(s) for s in schedules)
    width = max((len(b) for s in schedules for b in s), default=1)
    # Built on the CPU and moved once: on a GPU, one small copy per (step, client) would
    # cost more than the round's arithmetic.
    index = torch.zeros((num_steps, count, width), dtype=torch.long)
    mask = torch.zeros((num_steps, count, width), dtype=dtype)
    for c, batches in enumerate(schedules):
        for s, b in enumerate(batches):
            index[s, c, : len(b)] = b
            mask[s, c, : len(b)] = 1.0
    index, mask = index.to(device), mask.to(device)
    active = mask.amax(-1) > 0
    everyone = active.all(-1)

    penalty, quad = _split_penalty(penalty)

    def loss(theta, xb, yb, mb, n_i):
        return client_loss(net, theta, xb, yb, mb, n_i, penalty, spec.normalise)

    grads = vmap(grad(loss))
    rows = torch.arange(count, device=device)[:, None]
    theta = starts.detach().clone()
    optim = _RowOptimizer(theta, spec)
    for s in range(num_steps):
        if everyone[s]:
            g = grads(theta, x[rows, index[s]], y[rows, index[s]], mask[s], n)
            if quad is not None:
                quad.add_grad_(g, theta, n, spec.normalise)
            optim.step(theta, g, None)
            continue
        # Only clients with a minibatch left compute (sizes differ: no work on padding).
        live = active[s].nonzero().squeeze(1)
        sub = live[:, None]
        theta_live = theta[live]
        g = grads(
            theta_live, x[sub, index[s, live]], y[sub, index[s, live]], mask[s, live], n[live]
        )
        if quad is not None:
            quad.add_grad_(g, theta_live, n[live], spec.normalise)
        optim.step(theta, g, live)
    return theta


def schedules_for(
    sizes: Sequence[int], spec: LocalSpec, seed: int, server_round, clients: Sequence[int]
) -> List[List[torch.Tensor]]:
    """Each listed client's minibatches of a round, seeded by ``(seed, round, client)``."""
    return [
        batch_schedule(sizes[i], spec.batch_size, spec.epochs, derive_seed(seed, server_round, i))
        for i in clients
    ]


def steps_per_round(n: int, spec: LocalSpec) -> int:
    """Local steps of a client with ``n`` examples in one round."""
    return spec.epochs * math.ceil(n / spec.batch_size)
