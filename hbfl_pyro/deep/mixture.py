"""The mixture hierarchy for networks (method.md §6) with a federated gating network.

Model: ``K`` components, each a closed-form NIW family of :mod:`hbfl_pyro.deep.fedhb`
(:class:`~hbfl_pyro.NIWIso` or :class:`~hbfl_pyro.NIWDiag`) over all weights::

    pi                 ~ Dirichlet(alpha0 1_K)
    (mu_k, Sigma_k)    ~ NIW_k                     k = 1..K
    z_i | pi           ~ Categorical(pi)           one component per client
    theta_i | z_i = k  ~ N(mu_k, Sigma_k)
    y_ij               ~ Categorical(f(x_ij; theta_i))

with ``q(pi) = Dirichlet(alpha)``, ``q(mu_k, Sigma_k)`` of the prior's form,
``q(z_i) = Categorical(r_i)`` and ``q_i(theta_i) = N(m_i, eps^2 I)``.

**Client block.** With ``q(z_i)`` at its optimum, the client's ELBO block in ``m_i`` is its
summed log-likelihood plus ``log sum_k exp(l_ik(m_i))`` where::

    l_ik(m) = E[log pi_k] + E_q[log N(m; mu_k, Sigma_k)] - 0.5 eps^2 tr E_q[Sigma_k^{-1}]

(the last term is ``E_{q_i}`` of the Gaussian's quadratic about ``m``). So the client prox is
the *soft-min* ``-logsumexp_k l_ik(m)``; its gradient ``sum_k r_ik P_k (m - m0_k)``, with
``r_i = softmax_k l_ik(m_i)`` and ``P_k = a_k / b_k``, is a responsibility-weighted pull
towards the nearest centres (:class:`MixturePenalty`, added in place by the engines like
FedHB's :class:`~hbfl_pyro.deep.local.QuadraticPenalty`). The optimal ``q(z_i)`` is exactly
those ``r_i``: after local training a client computes them at its final ``m_i``.

**Server block.** A client sends, for every ``k``, its family summary times ``w_i r_ik``
(``w_i``: its participation/size weight, as in FedHB). The server adds them up per
component — sums stay sums, so secure aggregation still applies — and sets each
``q(mu_k, Sigma_k)`` by the family's closed form with ``N_k = N sum_i w_i r_ik / sum_i w_i``
clients, and ``q(pi) = Dirichlet(alpha0 + N_k)`` (``mixing="learned"``) or keeps
``pi`` uniform (``mixing="uniform"``, the paper's choice).

**Breaking the symmetry.** If every component started at the same centre, every client
would have the same responsibilities for all of them and the components would stay equal
forever. :func:`mixture_priors` gives component ``k`` its *own prior mean*: component 0
the network's initial weights, component ``k >= 1`` a fresh initialisation of the same
network (``reset_parameters`` of every layer) drawn with torch's RNG seeded by
``derive_seed(seed, "mixture-init", k)``. A component that no client chooses falls back to
its prior, i.e. to its own initialisation, not to another component.

**Where a client starts.** FedHB's clients start at ``m0``; here a client starts at the
centre whose network fits its training data best (lowest summed NLL minus
``E[log pi_k]``), computed locally from the ``K`` centres it receives; in the first
``warmup_rounds`` rounds the round's clients are instead dealt to the components in a
seeded order, so that every component is trained before clients choose. The start is an
optimiser choice, not part of the objective; the prox value at a centre is left out of it
on purpose: in ``d`` dimensions it is dominated by the component's volume
(``d / 2 log sigma2_k``), which says nothing about which basin fits the client's data.

**Hyper-priors for a mixture.** In ``d`` dimensions the responsibilities weigh the
components' volumes, ``(d / 2) log(a_k / b_k)``, against the distances to their centres.
With a hyper-prior worth whole clients (``pseudo_clients=1`` and a prior prox weight far
below the data's, e.g. :func:`~hbfl_pyro.deep.iso_prior`'s defaults) a component's prox
weight grows with its number of clients ``N_k``, so a component that had a few clients
fewer in one round is ``O(d)`` nats less dense everywhere and loses every client the next
round (seen on rotated MNIST: all clients in one component by round 5). State the
hyper-prior so the data dominate it (``pseudo_clients`` small, e.g. 0.01; prior prox weight
near the expected one, e.g. ``1 / eps^2``): then ``a_k / b_k ~ 1 / (eps^2 + spread_k)``
does not depend on ``N_k``, and the distances decide.

**Prediction.** Personalised: the client fine-tunes from its best centre with the soft-min
prox (:meth:`FedHBMixture.finetune`). Global (no client identity): ``p(y | x) = sum_k
g_k(x) p(y | x, m0_k)`` with a gating network ``g`` trained by FedAvg
(:meth:`FedHBMixture.train_gate`); the fallback is the uniform ensemble ``g_k = 1 / K``.

One module, longer than most: the mixture's server update, client start, responsibilities
and prediction are one method's parts and are read together (the layout of
``hbfl_pyro.deep`` is to be revisited as a whole, issue 17).
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_checkpoint
from ..dp import DPConfig
from ..families.base import ClosedFormFamily, Params
from ..families.niw import NIWDiag, NIWIso
from ..participation import check_participation
from ..seeding import derive_seed, seeded
from ..servers.closed_form import BLOCK, MixtureServer
from ..servers.dp import MIXTURE_REASON
from .baselines import FedProx
from .data import FederatedSplit
from .fedhb import (
    ClientLike,
    FederatedTrainer,
    MessageHook,
    iso_prior,
    prox_weight,
)
from .local import LocalSpec, QuadraticPenalty, batch_schedule, schedules_for
from .metrics import evaluate, scores
from .nets import FlatNet, WeightFunction

__all__ = [
    "FedHBMixture",
    "MixturePenalty",
    "cluster_directions",
    "component_inits",
    "evaluate_mixture",
    "mixture_priors",
]


# --------------------------------------------------------------------------------------
# Seeded component initialisation
# --------------------------------------------------------------------------------------


class _Resettable(Protocol):
    """A layer with ``reset_parameters()`` (torch types a module's attributes as tensors or
    modules, so the method is looked up by ``hasattr`` and named here)."""

    def reset_parameters(self) -> None: ...


def component_inits(net: nn.Module, num_components: int, seed: int = 0) -> torch.Tensor:
    """``K`` distinct starting weight vectors for the components (the symmetry breaker).

    Row 0 is ``net``'s own current weights; row ``k >= 1`` re-initialises a copy of ``net``
    (every submodule's ``reset_parameters``) with torch's RNG seeded by
    ``derive_seed(seed, "mixture-init", k)`` (the caller's RNG is left untouched).

    :param net: the network (not modified).
    :param num_components: ``K >= 1``.
    :returns: ``(K, d)``, in ``net``'s dtype and device.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import mlp
        >>> inits = component_inits(mlp((4, 5, 3)), 3, seed=1)
        >>> inits.shape, bool((inits[1] != inits[2]).any())
        (torch.Size([3, 43]), True)
    """
    if num_components < 1:
        raise ValueError(f"num_components must be >= 1, got {num_components}")
    rows = [FlatNet(net).vector()]
    for k in range(1, num_components):
        fresh = copy.deepcopy(net)
        resettable = [
            cast(_Resettable, m) for m in fresh.modules() if hasattr(m, "reset_parameters")
        ]
        if not resettable:
            raise ValueError(
                "the network has no layer with reset_parameters(); pass the components' "
                "initial weights to mixture_priors(inits=...) instead"
            )
        with seeded(derive_seed(seed, "mixture-init", k)):
            for m in resettable:
                m.reset_parameters()
        rows.append(FlatNet(fresh).vector())
    return torch.stack(rows)


def cluster_directions(
    updates: torch.Tensor, num_clusters: int, seed: int = 0, restarts: int = 10, iters: int = 100
) -> torch.Tensor:
    """Spherical k-means of client updates: which clients moved the shared model alike.

    Rows are scaled to unit length (an update's size says how far a client went, its
    direction what its data asked for) and grouped by k-means on the unit sphere (cosine
    similarity; k-means++ starts drawn with a generator seeded by ``(seed, restart)``);
    the restart with the largest total similarity to its centres wins. This is how the
    mixture's components are initialised from data instead of from random networks
    (:class:`FedHBMixture`'s ``cluster_rounds``), as k-means initialises EM for a
    Gaussian mixture.

    :param updates: ``(C, d)``, one update ``m_i - start_i`` per client.
    :param num_clusters: ``K``, at most ``C``.
    :returns: ``(C,)`` cluster labels in ``0..K-1``.

    Example::

        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(2, 50, generator=gen)
        >>> noise = lambda: 0.1 * torch.randn(4, 50, generator=gen)
        >>> rows = torch.cat([3 * a + noise(), b + noise()])
        >>> labels = cluster_directions(rows, 2)
        >>> labels[:4].unique().numel(), labels[4:].unique().numel(), bool(labels[0] != labels[4])
        (1, 1, True)
    """
    count = updates.shape[0]
    if not 1 <= num_clusters <= count:
        raise ValueError(f"cannot make {num_clusters} clusters of {count} client updates")
    unit = updates / torch.linalg.vector_norm(updates, dim=-1, keepdim=True).clamp_min(1e-30)
    best_labels, best_score = None, -float("inf")
    for restart in range(restarts):
        gen = torch.Generator().manual_seed(derive_seed(seed, "cluster", restart))
        # k-means++: each next start is drawn with probability ~ its distance to the nearest.
        picks = [int(torch.randint(count, (1,), generator=gen))]
        for _ in range(1, num_clusters):
            dist2 = (2 - 2 * unit @ unit[picks].T).clamp_min(0).min(-1).values
            probs = dist2.double().cpu() if dist2.sum() > 0 else torch.ones(count).double()
            picks.append(int(torch.multinomial(probs, 1, generator=gen)))
        centres = unit[picks]
        labels = None
        for _ in range(iters):
            new = (unit @ centres.T).argmax(-1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for k in range(num_clusters):
                members = unit[labels == k]
                if len(members):  # an emptied cluster keeps its centre
                    centres[k] = members.sum(0) / torch.linalg.vector_norm(members.sum(0))
        score = float((unit * centres[labels]).sum())
        if score > best_score:
            best_labels, best_score = labels, score
    if best_labels is None:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    return best_labels


def mixture_priors(
    net: nn.Module,
    num_components: int,
    prior=iso_prior,
    seed: int = 0,
    inits: Optional[torch.Tensor] = None,
    **kwargs,
) -> List[ClosedFormFamily]:
    """One per-parameter hyper-prior per component, each centred at its own initialisation.

    :param net: the network.
    :param num_components: ``K``.
    :param prior: :func:`~hbfl_pyro.deep.iso_prior` or :func:`~hbfl_pyro.deep.diag_prior`.
    :param seed: seeds :func:`component_inits`.
    :param inits: ``(K, d)`` initial weights to use instead of :func:`component_inits`.
    :param kwargs: passed to ``prior`` (``prox_weight``, ``pseudo_clients``, ``lambda0``).
    :returns: a list of ``K`` families; component 0 is ``prior(FlatNet(net).vector())``.

    Example::

        >>> from hbfl_pyro.deep import mlp, diag_prior
        >>> fams = mixture_priors(mlp((4, 5, 3)), 2, prior=diag_prior, prox_weight=2.0)
        >>> len(fams), type(fams[1]).__name__, bool((fams[0].mu0 != fams[1].mu0).any())
        (2, 'NIWDiag', True)
    """
    if inits is None:
        inits = component_inits(net, num_components, seed)
    if inits.shape[0] != num_components:
        raise ValueError(f"inits has {inits.shape[0]} rows for {num_components} components")
    return [prior(row, **kwargs) for row in inits]


# --------------------------------------------------------------------------------------
# The soft-min prox
# --------------------------------------------------------------------------------------


def _trace_precision(family: Union[NIWIso, NIWDiag], params: Params) -> torch.Tensor:
    """``tr E_q[Sigma^{-1}]``: ``d a / b`` (iso) or ``sum_k a_k / b_k`` (diag)."""
    w = prox_weight(family, params)
    return w * family.d if w.dim() == 0 else w.sum()


class MixturePenalty(QuadraticPenalty):
    """The mixture's client prox ``-logsumexp_k l_k(theta)`` (see the module docstring),
    ``l_k(theta) = c_k - 0.5 sum_j P_kj (theta_j - m0_kj)^2``.

    A :class:`~hbfl_pyro.deep.local.QuadraticPenalty` subclass, so the engines add its
    gradient ``s_i sum_k r_k(theta) P_k (theta - m0_k)`` in place (``r = softmax_k l_k``)
    instead of going through autograd; called, it is an ordinary differentiable function
    (tested equal to the in-place path). With ``K = 1``, ``r = 1`` exactly and the
    gradient is bit for bit FedHB's.

    :param centers: ``(K, d)``, the ``m0_k``.
    :param precisions: ``(K,)`` (iso) or ``(K, d)`` (diag), the ``P_k = a_k / b_k``.
    :param offsets: ``(K,)``, the ``c_k = l_k(m0_k)``.

    Example::

        >>> import torch
        >>> pen = MixturePenalty(torch.tensor([[0.0, 0.0], [4.0, 0.0]]),
        ...                      torch.tensor([1.0, 1.0]), torch.zeros(2))
        >>> pen.responsibilities(torch.tensor([[0.5, 0.0], [3.5, 0.0]])).argmax(-1).tolist()
        [0, 1]
    """

    def __init__(self, centers: torch.Tensor, precisions: torch.Tensor, offsets: torch.Tensor):
        super().__init__(centers[0], precisions[0])
        self.centers = centers
        self.precisions = precisions
        self.offsets = offsets

    def log_densities(self, theta: torch.Tensor) -> torch.Tensor:
        """``l_k(theta)`` for ``theta`` ``(..., d)``: shape ``(..., K)``."""
        cols = []
        for center, prec, offset in zip(self.centers, self.precisions, self.offsets):
            sq = (theta - center).pow(2)
            quad = prec * sq.sum(-1) if prec.dim() == 0 else (sq * prec).sum(-1)
            cols.append(offset - 0.5 * quad)
        return torch.stack(cols, -1)

    def responsibilities(self, theta: torch.Tensor) -> torch.Tensor:
        """``softmax_k l_k(theta)``: the optimal ``q(z)`` at ``theta``, shape ``(..., K)``."""
        return torch.softmax(self.log_densities(theta), -1)

    def __call__(self, theta: torch.Tensor, n) -> torch.Tensor:
        return -torch.logsumexp(self.log_densities(theta), -1)

    def add_grad_(
        self, g: torch.Tensor, theta: torch.Tensor, n: torch.Tensor, normalise: bool
    ) -> None:
        """``g += s_i sum_k r_ik P_k (theta - m0_k)`` in place (``g``, ``theta``: ``(C, d)``)."""
        scale = 1.0 / n if normalise else torch.ones_like(n)
        if len(self.centers) == 1:
            r = torch.ones_like(theta[:, :1])
        else:
            with torch.no_grad():
                r = self.responsibilities(theta)
        buf = self._buffer
        if buf is None or buf.shape != theta.shape or buf.dtype != theta.dtype:
            buf = self._buffer = torch.empty_like(theta)
        for k, (center, prec) in enumerate(zip(self.centers, self.precisions)):
            torch.sub(theta, center, out=buf)
            # Same operation order as QuadraticPenalty (r = 1 exactly when K = 1).
            if prec.dim():
                buf.mul_(prec)
                g.addcmul_(buf, (scale * r[:, k])[:, None])
            else:
                g.addcmul_(buf, (scale * r[:, k] * prec)[:, None])


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


def _layout(net: FlatNet) -> Dict[str, List[int]]:
    """``{parameter name: shape}`` of a network, as plain values (for the state)."""
    return {name: list(shape) for name, shape in zip(net.names, net.shapes)}


class _GateFedAvg(FedProx):
    """FedAvg for the gating network: targets are probability vectors ``(n, K)`` (soft
    labels; ``F.cross_entropy`` takes them), so they are kept as floats."""

    def prepare(self, clients):
        dtype, device = self.init.dtype, self.init.device
        return [
            (x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)) for x, t in clients
        ]


class FedHBMixture(FederatedTrainer):
    """FedHB with a mixture of ``K`` NIW components (see the module docstring).

    :param net: the network (its current weights are component 0's start).
    :param clients: training clients, :class:`~hbfl_pyro.deep.data.ClientSplit` or
        ``(x_train, y_train)`` pairs.
    :param families: ``K`` families of dimension ``d`` (:func:`mixture_priors`), all
        :class:`~hbfl_pyro.NIWIso` or all :class:`~hbfl_pyro.NIWDiag`; one family alone is
        ``K = 1``, which is :class:`~hbfl_pyro.deep.FedHB` exactly (tested).
    :param eps: the fixed scale of ``q_i`` (as in FedHB).
    :param mixing: ``"learned"`` (``q(pi) = Dirichlet(alpha0 + N_k)``) or ``"uniform"``.
    :param alpha0: the Dirichlet prior's concentration per component.
    :param participation: ``"stale"`` (the default here; stale replies keep the
        responsibilities they were sent with) or ``"scaled"`` (as in FedHB). Under
        ``"scaled"`` a component that no client of a round chose gets ``N_k = 0`` and
        falls back to its prior, i.e. its random initialisation: with few clients per round
        that wipes out a trained component (seen on rotated MNIST), stale sums keep it.
    :param weighting: ``"equal"`` or ``"size"`` (as in FedHB).
    :param warmup_rounds: rounds in which clients are dealt to components in a seeded
        order instead of choosing their best centre (see :meth:`client_starts`).
    :param cluster_rounds: the other way to start (exclusive with ``warmup_rounds``; needs
        ``participation="stale"``): for this many rounds every client starts at component
        0's centre and only component 0 is fitted (FedHB, ``K = 1``); then the server
        groups the clients it has heard from by the direction of their updates
        ``m_i - m0`` (:func:`cluster_directions`), gives each its group as one-hot
        responsibilities, and refits all ``K`` components from the pool. Clients whose
        data differ alike (a rotation) pull the shared model the same way, so the
        components start where those groups' models are, not at random networks (with
        those, the first component to improve wins every client: the collapse seen on
        rotated MNIST).
    :param hold_rounds: after the clustering, for this many rounds each clustered client
        keeps its group: it starts at its component's centre and reports the one-hot
        ``q(z_i)`` of its group (a client first heard from then picks its best centre and
        keeps it). Any ``q(z_i)`` gives a valid ELBO; holding it lets each component learn
        its group's data before clients compare them. Right after the clustering the
        centres differ by one round's updates, and 5 local epochs move a client further in
        the direction every client shares than the components are apart, so the freshest
        centre is nearest to all (measured: purity 1.0 at the clustering, one component
        for all 40 clients 7 rounds later without holding).
    :param on_message: a hook ``(direction, client, message)`` called with every message,
        as the core's ``FederatedSVI(on_message=...)`` (see
        :class:`~hbfl_pyro.deep.FederatedTrainer`): ``"down"`` with the server's message
        (``round``, ``mode``, ``seed``, every component's ``family_params``, ``alpha``),
        ``"up"`` with the reply (``client``, ``round``, ``num_examples``, ``m``: its
        ``m_i``, ``responsibilities``: its ``r_i``).
    :param dp: not supported yet (raises ``NotImplementedError`` saying why,
        :data:`~hbfl_pyro.servers.dp.MIXTURE_REASON`): deep differential privacy is
        :class:`~hbfl_pyro.deep.FedHB`'s ``dp=`` (one family).
    :param kwargs: ``fraction``, ``local``, ``engine``, ``chunk_size``, ``seed``.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = mlp((4, 8, 3))
        >>> clients = [(torch.randn(20, 4), torch.randint(0, 3, (20,))) for _ in range(6)]
        >>> fit = FedHBMixture(net, clients, mixture_priors(net, 2, seed=0), eps=0.05,
        ...                    local=LocalSpec(epochs=1, batch_size=8, lr=0.1))
        >>> record = fit.run(2)[-1]
        >>> record["responsibilities"].shape, round(float(record["counts"].sum()), 6)
        (torch.Size([6, 2]), 6.0)
        >>> probs = fit.predict_proba(torch.randn(5, 4), gate=False)
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(5)))
        (torch.Size([5, 3]), True)
    """

    STATE = {
        "server": "server_state",
        "client_resp": "client_resp",
        "labels": "labels",
        "updates": "_updates",
    }
    SETTINGS = (
        "families",
        "eps",
        "mixing",
        "alpha0",
        "participation",
        "weighting",
        "warmup_rounds",
        "cluster_rounds",
        "hold_rounds",
    )

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        families: Union[ClosedFormFamily, Sequence[ClosedFormFamily]],
        *,
        eps: float = 0.0,
        mixing: str = "learned",
        alpha0: float = 1.0,
        participation: str = "stale",
        weighting: str = "equal",
        warmup_rounds: int = 0,
        cluster_rounds: int = 0,
        hold_rounds: int = 0,
        on_message: Optional[MessageHook] = None,
        dp: Optional[DPConfig] = None,
        **kwargs,
    ):
        if dp is not None:
            raise NotImplementedError(
                "differential privacy of the mixture is not supported yet: " + MIXTURE_REASON
            )
        super().__init__(net, clients, **kwargs)
        if on_message is not None and not callable(on_message):
            raise TypeError(
                f"on_message must be a callable (direction, client, message), got "
                f"{type(on_message).__name__}"
            )
        self.hooks = [on_message] if on_message is not None else []
        given = [families] if isinstance(families, ClosedFormFamily) else list(families)
        if not given:
            raise ValueError("families is empty: pass K >= 1 families (mixture_priors)")
        kinds = {type(f) for f in given}
        components = [f for f in given if isinstance(f, (NIWIso, NIWDiag))]
        if len(kinds) != 1 or len(components) != len(given):
            raise ValueError(
                "every component must be an NIWIso or every one an NIWDiag (use "
                f"mixture_priors); got {[type(f).__name__ for f in given]}"
            )
        for k, fam in enumerate(components):
            if fam.d != self.net.d:
                raise ValueError(
                    f"component {k}'s family has d = {fam.d}, the network {self.net.d}"
                )
        if mixing not in ("learned", "uniform"):
            raise ValueError(f"mixing must be 'learned' or 'uniform', got {mixing!r}")
        check_participation(participation)
        if weighting not in ("equal", "size"):
            raise ValueError(f"weighting must be 'equal' or 'size', got {weighting!r}")
        if alpha0 <= 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        if cluster_rounds < 0:
            raise ValueError(f"cluster_rounds must be >= 0, got {cluster_rounds}")
        if cluster_rounds and warmup_rounds:
            raise ValueError(
                "warmup_rounds and cluster_rounds are two ways to start the components: "
                "give one of them"
            )
        if cluster_rounds and participation != "stale":
            raise ValueError(
                'cluster_rounds needs participation="stale" (the components are refitted '
                "from every client's latest reply)"
            )
        self.warmup_rounds = int(warmup_rounds)
        if hold_rounds < 0:
            raise ValueError(f"hold_rounds must be >= 0, got {hold_rounds}")
        self.cluster_rounds = int(cluster_rounds)
        self.hold_rounds = int(hold_rounds)
        #: each client's component while ``q(z_i)`` is held (see ``hold_rounds``).
        self.labels: Dict[int, int] = {}
        #: clients' updates ``m_i - start`` during the shared rounds (``cluster_rounds``).
        self._updates: Dict[int, torch.Tensor] = {}
        self.K = len(components)
        self.mixing = mixing
        #: The server strategy: every component's q(mu_k, Sigma_k), q(pi), participation,
        #: weighting and the closed-form updates are its.
        self.server = MixtureServer(
            components,
            range(self.num_clients),
            alpha0=alpha0,
            alpha=self.init.new_full((self.K,), float(alpha0)),
            eps=eps,
            participation=participation,
            weighting=weighting,
            sizes=self.sizes,
            fraction=self.fraction,
            min_clients=self.min_clients,
            seed=self.seed,
        )
        #: each client's latest responsibilities ``(K,)`` (from its last reply).
        self.client_resp: Dict[int, torch.Tensor] = {}
        self.gate: Optional[WeightFunction] = None
        self.gate_weights: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ the server's
    # The settings and q are the server's; read here for the fingerprint and the views.
    @property
    def families(self) -> List[Union[NIWIso, NIWDiag]]:
        # (Checked in __init__: every component is an NIWIso or every one an NIWDiag.)
        return cast(List[Union[NIWIso, NIWDiag]], self.server.families)

    @property
    def eps(self) -> float:
        return self.server.eps

    @property
    def alpha0(self) -> float:
        return self.server.alpha0

    @property
    def participation(self) -> str:
        return self.server.participation

    @property
    def weighting(self) -> str:
        return self.server.weighting

    @property
    def params(self) -> List[Params]:
        """Every component's ``q(mu_k, Sigma_k)`` parameters (the server's)."""
        return self.server.family_params

    @params.setter
    def params(self, value: List[Params]) -> None:
        self.server.family_params = value

    @property
    def alpha(self) -> torch.Tensor:
        """``q(pi)``'s concentrations ``(K,)`` (the server's)."""
        return self.server.alpha

    @alpha.setter
    def alpha(self, value: torch.Tensor) -> None:
        self.server.alpha = value

    @property
    def server_state(self) -> Dict:
        """The server's :meth:`~hbfl_pyro.servers.closed_form.MixtureServer.state_dict`
        (what :meth:`state_dict` keeps under ``"server"``)."""
        return self.server.state_dict()

    @server_state.setter
    def server_state(self, state: Dict) -> None:
        self.server.load_state_dict(state)

    def select(self, server_round: int) -> List[int]:
        """The server's selection (the same clients as every other trainer's)."""
        return [int(i) for i in self.server.select(server_round)]

    # ------------------------------------------------------------------ q(phi) views
    # The views take the q a client was sent (its message's family_params and alpha);
    # by default the server's current one.
    def centers(self, params: Optional[List[Params]] = None) -> torch.Tensor:
        """The components' ``m0_k``, ``(K, d)``."""
        return torch.stack([p["m0"] for p in (self.params if params is None else params)])

    def log_weights(self, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``E_q[log pi_k]``, ``(K,)``: ``digamma(alpha_k) - digamma(sum alpha)`` or
        ``-log K``."""
        alpha = self.alpha if alpha is None else alpha
        if self.mixing == "uniform":
            return alpha.new_full((self.K,), -torch.log(torch.tensor(float(self.K))).item())
        return torch.digamma(alpha) - torch.digamma(alpha.sum())

    def mixing_weights(self) -> torch.Tensor:
        """``E_q[pi]``, ``(K,)``."""
        if self.mixing == "uniform":
            return self.alpha.new_full((self.K,), 1.0 / self.K)
        return self.alpha / self.alpha.sum()

    def global_weights(self) -> torch.Tensor:
        """The centre of the component that holds the most clients (largest ``alpha_k``,
        also under ``mixing="uniform"``, whose ``E[pi]`` is flat): a single network, for
        code that needs one; the mixture's own global prediction is :meth:`predict_proba`."""
        return self.params[int(self.alpha.argmax())]["m0"]

    def prox_weights(self) -> List[float]:
        """Each component's prox weight, mean over coordinates (summed-NLL scale)."""
        return [float(prox_weight(f, p).mean()) for f, p in zip(self.families, self.params)]

    # ------------------------------------------------------------------ client side
    def penalty(
        self, params: Optional[List[Params]] = None, alpha: Optional[torch.Tensor] = None
    ) -> MixturePenalty:
        """The soft-min prox under ``q`` (the current one by default; ``params`` and
        ``alpha`` as a message carries them)."""
        params = self.params if params is None else params
        log_w = self.log_weights(alpha)
        centers, precisions, offsets = [], [], []
        for k, (fam, p) in enumerate(zip(self.families, params)):
            center = p["m0"]
            centers.append(center)
            precisions.append(p["a"] / p["b"])
            # l_k at its own centre: E[log pi_k] + E_q log N(m0_k; k) - eps^2/2 tr E[P_k].
            offset = fam.expected_log_prior(center, p) - 0.5 * self.eps**2 * _trace_precision(
                fam, p
            )
            offsets.append(log_w[k] + offset)
        # Only differences of the offsets matter (softmax, gradient); their common part is
        # of order d / lambda0 (1e8 for an MLP), where float32 keeps no units: subtract it
        # in float64.
        stacked = torch.stack([o.double() for o in offsets])
        stacked = (stacked - stacked.max()).to(centers[0].dtype)
        return MixturePenalty(torch.stack(centers), torch.stack(precisions), stacked)

    def responsibilities(self, thetas: torch.Tensor) -> torch.Tensor:
        """The clients' optimal ``q(z_i)`` at their ``m_i`` under the current ``q``:
        ``(C, K)``, rows summing to one."""
        return self.penalty().responsibilities(thetas)

    @torch.no_grad()
    def client_starts(
        self, data, server_round=None, q: Optional[Tuple[List[Params], torch.Tensor]] = None
    ) -> torch.Tensor:
        """Each client's starting vector ``(C, d)``: the centre with the lowest summed NLL
        on its training data minus ``E[log pi_k]`` (see the module docstring). In the
        first ``warmup_rounds`` rounds the round's clients are dealt to the components
        in turn, in an order seeded by ``(seed, round)``, so every component is trained
        before clients choose (otherwise the first component to improve wins every
        client and the others stay at their random initialisation).

        :param q: ``(family_params, alpha)`` as the clients were sent them (default: the
            current ``q``)."""
        centers = self.centers(None if q is None else q[0])
        if self.K == 1:
            return centers[0].expand(len(data), -1)
        if server_round is not None and server_round <= self.warmup_rounds:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "warmup"))
            order = torch.randperm(len(data), generator=gen)
            which = torch.empty(len(data), dtype=torch.long)
            which[order] = torch.arange(len(data)) % self.K
            return centers[which.to(centers.device)]
        return centers[self.best_components(data, q)]

    @torch.no_grad()
    def best_components(
        self, data, q: Optional[Tuple[List[Params], torch.Tensor]] = None
    ) -> List[int]:
        """Each client's centre with the lowest summed NLL on its training data minus
        ``E[log pi_k]`` (under ``q = (family_params, alpha)``, the current one by default)."""
        params, alpha = (None, None) if q is None else q
        centers, log_w = self.centers(params), self.log_weights(alpha)
        best = []
        for x, y in data:
            nll = torch.stack(
                [F.cross_entropy(self.net(c, x), y, reduction="sum") for c in centers]
            )
            best.append(int((nll - log_w).argmin()))
        return best

    def messages(self, server_round: int, chosen: List[int]) -> Dict[int, Dict]:
        """The server's message to each chosen client
        (:meth:`MixtureServer.message <hbfl_pyro.servers.closed_form.MixtureServer.message>`:
        the round, the mode, the client's seed, every component's parameters, ``alpha``)."""
        return {i: self.server.message(server_round, i) for i in chosen}

    REPLY = ("m", "responsibilities")

    def local_updates(self, server_round: int, chosen: List[int]):
        """Best-centre starts and local training with the soft-min prox; in the shared
        rounds of ``cluster_rounds`` component 0's centre and prox, in the ``hold_rounds``
        each client's held component. Each client reads only its message: the centres,
        precisions and ``alpha`` it was sent, and its seed for its minibatches. Returns
        ``(thetas, responsibilities)``: each client's ``m_i`` and ``r_i`` (its optimal
        ``q(z_i)`` at ``m_i`` under the ``q`` it was sent; the held one-hot ``q(z_i)`` in
        the shared and held rounds)."""
        sent = self.received(server_round, chosen)
        # Every message of a round carries the same q (only the seeds differ), so the
        # batched training reads the first one's, as the core's VectorisedEngine does.
        q = (sent[chosen[0]]["family_params"], sent[chosen[0]]["alpha"])
        spec = self.local
        schedules = [
            batch_schedule(self.sizes[i], spec.batch_size, spec.epochs, sent[i]["seed"])
            for i in chosen
        ]
        data = [self.data[i] for i in chosen]
        if server_round <= self.cluster_rounds:
            starts = self.centers(q[0])[0]
            thetas = self.train(starts, data, schedules, self._shared_penalty(q[0]))
            resp = torch.zeros(len(chosen), self.K, dtype=thetas.dtype, device=thetas.device)
            resp[:, 0] = 1.0
            return thetas, resp
        penalty = self.penalty(*q)
        if server_round <= self.cluster_rounds + self.hold_rounds:
            new = [(i, x) for i, x in zip(chosen, data) if i not in self.labels]
            # A client first heard from now keeps the centre it chooses.
            picks = self.best_components([x for _, x in new], q)
            self.labels.update(zip([i for i, _ in new], picks))
            starts = self.centers(q[0])[[self.labels[i] for i in chosen]]
            thetas = self.train(starts, data, schedules, penalty)
            resp = F.one_hot(torch.tensor([self.labels[i] for i in chosen]), self.K)
            return thetas, resp.to(thetas)
        starts = self.client_starts(data, server_round, q)
        thetas = self.train(starts, data, schedules, penalty)
        return thetas, penalty.responsibilities(thetas)

    def aggregate_round(self, server_round: int, chosen: List[int], replies) -> Dict:
        """The per-component server update (:meth:`aggregate`); at the end of the shared
        rounds of ``cluster_rounds``, the clustering (record entry ``"clusters"``). In the
        shared rounds the clients' updates ``m_i - m0`` are kept for it first (those of
        the clients that replied; component 0's centre has not moved since they started)."""
        thetas, resp = replies
        if server_round <= self.cluster_rounds:
            self._updates.update(zip(chosen, thetas - self.centers()[0]))
        entries = self.aggregate(chosen, thetas, resp)
        if server_round == self.cluster_rounds:
            entries["clusters"] = self._cluster_components(thetas)
        return entries

    def _shared_penalty(self, params: Optional[List[Params]] = None) -> MixturePenalty:
        """Component 0's prox alone (FedHB's quadratic), for the shared rounds."""
        p = (self.params if params is None else params)[0]
        return MixturePenalty(p["m0"][None], (p["a"] / p["b"])[None], p["m0"].new_zeros(1))

    def _cluster_components(self, like: torch.Tensor) -> Dict[int, int]:
        """End of the shared rounds: cluster the clients heard from by their updates, make
        each group a component (one-hot responsibilities in the pool) and refit all."""
        pool = sorted(self._updates)
        labels = cluster_directions(
            torch.stack([self._updates[i] for i in pool]), self.K, derive_seed(self.seed, "k")
        )
        onehot = F.one_hot(labels, self.K).to(like)
        for i, r, k in zip(pool, onehot, labels.tolist()):
            self.server.stale[i] = (self.server.stale[i][0], r)
            self.client_resp[i] = r
            self.labels[i] = k
        self._update_from_pool()
        self._updates.clear()
        return {i: int(k) for i, k in zip(pool, labels)}

    # ------------------------------------------------------------------ server side
    def aggregate(
        self, chosen: List[int], thetas: torch.Tensor, resp: Optional[torch.Tensor] = None
    ) -> Dict:
        """Responsibility-weighted sums per component and the closed-form update of each.

        :param resp: the clients' responsibilities ``(C, K)``; by default computed at
            ``thetas`` under the current ``q`` (what each client sends).
        """
        if resp is None:
            resp = self.responsibilities(thetas)
        for j, i in enumerate(chosen):
            self.client_resp[i] = resp[j]
        # A client's summary depends on m_i and eps only: its reply is m_i and its r_i.
        stale = self.participation == "stale"
        replies = {
            i: (thetas[j].clone() if stale else thetas[j], resp[j]) for j, i in enumerate(chosen)
        }
        if self.server.pool(replies) is self.server.stale:
            counts = self._update_from_pool()
        else:
            counts = self._update_from(chosen, lambda s: thetas[s : s + BLOCK], resp)
        return {
            "responsibilities": resp.detach().clone(),
            "counts": counts,
            "prox_weights": self.prox_weights(),
        }

    def _update_from_pool(self) -> torch.Tensor:
        """Every component's closed-form update from the stale pool (each client's latest
        ``m_i`` and responsibilities); returns the counts ``N_k``."""
        stale = self.server.stale
        pool = sorted(stale)

        def rows(s):
            return torch.stack([stale[i][0] for i in pool[s : s + BLOCK]])

        return self._update_from(pool, rows, torch.stack([stale[i][1] for i in pool]))

    def _update_from(self, clients: List[int], rows, resp: torch.Tensor) -> torch.Tensor:
        """Hand the server the sums over ``clients`` of their summaries (``rows(s)``: the
        block of ``m_i`` starting at ``s``) weighted by ``w_i r_ik``, formed in blocks
        without per-client copies; the server updates every component and ``q(pi)``.
        Returns ``N_k``."""
        server = self.server
        w = server.multiplicities(clients, resp)
        total = server.weighted_sums(w, resp, rows, len(clients))
        return server.aggregate_sum(self.round + 1, total, clients)["counts"]

    # ------------------------------------------------------------------ personalisation
    def finetune(
        self,
        data: Sequence[ClientLike],
        epochs: int,
        tag: str = "finetune",
        clients: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Personalise (method.md §7): each client starts at its best centre and trains
        ``epochs`` epochs with the soft-min prox. :attr:`finetune_resp` holds the clients'
        responsibilities at the result. ``clients`` (the training clients' indices) is
        accepted for :class:`FederatedTrainer`'s signature; training and new clients are
        treated alike (both choose their centre from their own data).

        :returns: the personalised vectors ``(C, d)``.
        """
        spec, data, schedules = self.finetune_plan(data, epochs, tag)
        thetas = self.train(self.client_starts(data), data, schedules, self.penalty(), spec)
        self.finetune_resp = self.responsibilities(thetas)
        return thetas

    # ------------------------------------------------------------------ gating
    def gate_targets(self, labels: str = "responsibility") -> List[torch.Tensor]:
        """Each training client's targets for the gating network, ``(n_i, K)`` each.

        ``"responsibility"`` (the default): every example of client ``i`` gets the
        client's latest ``r_i`` (a client that never took part runs one local round now to
        compute them). In the hierarchy ``z_i`` belongs to the client, all its examples
        share it, and ``r_i`` is its variational posterior; per-example likelihood labels
        are noisy for images every component classifies alike (a rotated ``0`` or ``8``).
        ``"likelihood"``: example ``j`` gets the one-hot of
        ``argmax_k log p(y_j | x_j, m0_k) + E[log pi_k]``.
        """
        if labels not in ("responsibility", "likelihood"):
            raise ValueError(f"labels must be 'responsibility' or 'likelihood', got {labels!r}")
        if labels == "likelihood":
            centers, log_w = self.centers(), self.log_weights()
            out = []
            with torch.no_grad():
                for x, y in self.data:
                    ll = torch.stack(
                        [-F.cross_entropy(self.net(c, x), y, reduction="none") for c in centers],
                        -1,
                    )
                    out.append(F.one_hot((ll + log_w).argmax(-1), self.K).to(x.dtype))
            return out
        missing = [i for i in range(self.num_clients) if i not in self.client_resp]
        if missing:
            data = [self.data[i] for i in missing]
            schedules = schedules_for(self.sizes, self.local, self.seed, "gate", missing)
            thetas = self.train(self.client_starts(data), data, schedules, self.penalty())
            for i, r in zip(missing, self.responsibilities(thetas)):
                self.client_resp[i] = r
        return [self.client_resp[i].expand(len(y), -1) for i, (_, y) in enumerate(self.data)]

    def train_gate(
        self,
        gate_net: nn.Module,
        rounds: int,
        *,
        labels: str = "responsibility",
        local: Optional[LocalSpec] = None,
        fraction: Optional[float] = None,
    ) -> WeightFunction:
        """Train the gating network ``g(x) -> softmax over K`` by FedAvg on the training
        clients (their images, :meth:`gate_targets` as soft labels), after the mixture.

        :param gate_net: a network with ``K`` outputs (its weights are the start; not
            modified).
        :param rounds: FedAvg rounds.
        :param labels: see :meth:`gate_targets`.
        :param local: local training of the gate (default: the mixture's).
        :param fraction: clients per round (default: the mixture's).
        :returns: the gate as a :class:`~hbfl_pyro.deep.FlatNet`; its weights are
            :attr:`gate_weights`.
        """
        targets = self.gate_targets(labels)
        clients = [(x, t) for (x, _), t in zip(self.data, targets)]
        fed = _GateFedAvg(
            gate_net,
            clients,
            fraction=self.fraction if fraction is None else fraction,
            local=local or self.local,
            engine=self.engine,
            chunk_size=self.chunk_size,
            seed=derive_seed(self.seed, "gate"),
        )
        fed.run(rounds)
        self.gate, self.gate_weights = fed.net, fed.global_weights()
        return self.gate

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """:meth:`FederatedTrainer.state_dict <hbfl_pyro.deep.FederatedTrainer.state_dict>`
        plus the trained gating network under ``"gate"``: ``None`` before
        :meth:`train_gate`, else ``{"layout": {parameter name: shape}, "weights": (d_g,)}``
        (its architecture is code, so a resumed trainer is given it: :meth:`load_state_dict`)."""
        state = super().state_dict()
        if self.gate is None or self.gate_weights is None:  # set together
            state["gate"] = None
        else:
            state["gate"] = {
                "layout": _layout(cast(FlatNet, self.gate)),
                "weights": self.gate_weights.clone(),
            }
        return state

    def load_state_dict(self, state: Dict, gate_net: Optional[nn.Module] = None) -> None:
        """Continue from a :meth:`state_dict`, gating network included: the resumed
        mixture predicts as the one that wrote the state, bit for bit.

        :param gate_net: the gating network's architecture (a module like the one given to
            :meth:`train_gate`; its own weights are not used), needed when the state holds
            a trained gate and this trainer has none. A state without a gate (written
            before :meth:`train_gate`, or by an earlier version) leaves none.
        :raises ValueError: when the state holds a gate and no architecture is given, or
            the given one's parameters differ from the state's (nothing is changed then).
        """
        if "params" in state and "server" not in state:
            # The former layout, before the server strategy held q and the stale pool.
            state = dict(state)
            state["server"] = {
                "mode": self.server.mode,
                "family_params": state.pop("params"),
                "alpha": state.pop("alpha"),
                "stale": state.pop("stale", {}),
            }
        gate = state.get("gate")
        flat = None
        if gate is not None:
            if gate_net is not None:
                flat = FlatNet(gate_net)
            elif isinstance(self.gate, FlatNet):
                flat = self.gate
            else:
                raise ValueError(
                    "the state holds a trained gating network: give its architecture, "
                    "load_state_dict(state, gate_net=...) or resume(path, gate_net=...)"
                )
            if _layout(flat) != gate["layout"]:
                raise ValueError(
                    f"the gating network's layout {_layout(flat)} differs from the state's "
                    f"{gate['layout']}"
                )
        super().load_state_dict({k: v for k, v in state.items() if k != "gate"})
        self.gate = flat
        self.gate_weights = None if gate is None else gate["weights"].clone()

    def resume(self, path, gate_net: Optional[nn.Module] = None) -> None:
        """:meth:`FederatedTrainer.resume <hbfl_pyro.deep.FederatedTrainer.resume>` with the
        gating network's architecture (see :meth:`load_state_dict`)."""
        self.load_state_dict(load_checkpoint(path, self.fingerprint()), gate_net=gate_net)

    # ------------------------------------------------------------------ global prediction
    @torch.no_grad()
    def gate_probs(self, x: torch.Tensor, gate: bool = True) -> torch.Tensor:
        """``g(x)``, ``(n, K)``: the trained gate's softmax, or uniform ``1 / K`` when
        ``gate=False`` or no gate was trained (the fallback)."""
        x = x.to(dtype=self.init.dtype, device=self.init.device)
        if not gate or self.gate is None or self.gate_weights is None:  # set together
            return x.new_full((len(x), self.K), 1.0 / self.K)
        return torch.softmax(self.gate(self.gate_weights, x), -1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, gate: bool = True, batch: int = 4096) -> torch.Tensor:
        """``p(y | x) = sum_k g_k(x) softmax f(x; m0_k)``, ``(n, classes)`` on the CPU."""
        x = x.to(dtype=self.init.dtype, device=self.init.device)
        if gate and self.gate is None:
            warnings.warn("no gating network trained: using the uniform ensemble", stacklevel=2)
        out = []
        centers = self.centers()
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            g = self.gate_probs(xb, gate)
            probs = torch.stack([torch.softmax(self.net(c, xb), -1) for c in centers], 1)
            out.append((g[:, :, None] * probs).sum(1).cpu())
        return torch.cat(out)


def evaluate_mixture(
    fit: FedHBMixture, split: FederatedSplit, finetune_epochs: int = 5
) -> Dict[str, float]:
    """:func:`~hbfl_pyro.deep.metrics.evaluate` for the mixture: personalised and new-client
    metrics as there (fine-tuning by :meth:`FedHBMixture.finetune`); ``global_*`` and
    ``new_global_acc`` from the gated mixture (uniform when no gate was trained), plus
    ``global_uniform_*`` (the fallback) and ``global_top_*`` (the single most-weighted
    centre).
    """
    out = evaluate(fit, split, finetune_epochs=finetune_epochs)
    for key in ("acc", "nll", "ece"):
        out[f"global_top_{key}"] = out[f"global_{key}"]
    gated = fit.gate is not None
    for prefix, use_gate in (("global", gated), ("global_uniform", False)):
        probs = fit.predict_proba(split.x_test, gate=use_gate)
        tiny = torch.finfo(probs.dtype).tiny  # a zero probability must not give -inf logits
        for key, value in scores(probs.clamp_min(tiny).log(), split.y_test).items():
            out[f"{prefix}_{key}"] = value
    if split.new_clients:
        x = torch.cat([c.x_test for c in split.new_clients])
        y = torch.cat([c.y_test for c in split.new_clients])
        out["new_global_acc"] = float(
            (fit.predict_proba(x, gate=gated).argmax(-1) == y).double().mean()
        )
    return out
