"""A closed-form server strategy on weighted sums of client summaries.

:class:`FamilyServer` is the server of a hierarchy whose server block a
:class:`~hbfl_pyro.families.base.ClosedFormFamily` solves exactly, for clients whose
``q_i = N(m_i, var I)`` has a variance the server knows (the deep trainers' ``eps^2``):
a client's reply is its mean ``m_i``, from which the server forms the family's summary.
Everything that makes FedAvg, FedProx and FedHB different is the family it is given
(:func:`~hbfl_pyro.deep.fedavg_family`, :func:`~hbfl_pyro.deep.fedprox_family`,
:func:`~hbfl_pyro.deep.iso_prior`, ...); selection, participation (``scaled`` /
``stale``), weighting, the update and the state are the strategy's.

A round's update takes the *weighted sums* of the summaries
(:meth:`FamilyServer.aggregate_sum`), so a simulation that holds its clients' ``m_i``
stacked computes them in blocks (:func:`summed_summaries`) without a per-client copy of
any ``d``-dimensional summary; :meth:`FamilyServer.aggregate` is the same update from
per-client replies. :class:`MixtureServer` is the same for a mixture of ``K`` families
(the deep mixture's server).

Why the core's :class:`~hbfl_pyro.server.ClosedFormServer` is not this class: it learns
the replies' shapes by tracing a Pyro model on a placeholder (a network client has none),
its clients send their summaries (a second moment of ``(d,)`` or ``(d, d)`` each, where a
network client sends ``m_i`` and the sums are formed in blocks without per-client
summaries), its stale pool keeps those summaries, and its secure sum is an unweighted sum
scaled by ``N / n``, which cannot express FedAvg's data-size weighting. Both call the
family's ``server_update`` on sums that stand for all ``N`` clients and keep
``{"mode", "family_params", "stale"}`` as their state.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..families.base import ClosedFormFamily, Params
from ..participation import check_participation, pool_replies, scale_factor
from ..seeding import derive_seed
from .base import ServerStrategy

#: The ways a round's summaries are weighted (see :func:`client_multiplicities`).
WEIGHTING = ("equal", "size")

#: Clients per block when summing summaries: with all of a round's clients at once, the
#: ``(C, d)`` temporaries' memory traffic costs more on a CPU than the sums themselves.
BLOCK = 32


def client_multiplicities(
    pool: Sequence[Any],
    sizes: Sequence[int],
    num_clients: int,
    weighting: str,
    like: torch.Tensor,
    names: Optional[Sequence[Any]] = None,
) -> torch.Tensor:
    """How many times each summary in ``pool`` counts, ``(len(pool),)``; they sum to ``N``.

    ``"equal"``: ``N / |pool|`` each (the hierarchy as written, every client one draw from
    ``p(theta | phi)``; :func:`~hbfl_pyro.participation.scale_factor`); ``"size"``:
    ``N n_i / sum_j n_j`` (FedAvg's data-size weights), ``n_i`` the client's training-set
    size.

    :param pool: the clients summed (indices into ``sizes``, or names in ``names``).
    :param sizes: every client's training-set size (read for ``"size"`` only).
    :param names: the clients' names in ``sizes``' order, when ``pool`` holds names.
    :param like: the multiplicities take its dtype and device.

    Example::

        >>> import torch
        >>> client_multiplicities([0, 2], [10, 20, 30], 3, "size", torch.zeros(1)).tolist()
        [0.75, 2.25]
        >>> client_multiplicities([0, 2], [10, 20, 30], 3, "equal", torch.zeros(1)).tolist()
        [1.5, 1.5]
    """
    if weighting == "size":
        index = {name: i for i, name in enumerate(names)} if names is not None else None
        n = torch.tensor(
            [float(sizes[index[i] if index is not None else i]) for i in pool],
            dtype=like.dtype,
            device=like.device,
        )
        return num_clients * n / n.sum()
    scale = scale_factor(num_clients, len(pool))
    return torch.full((len(pool),), scale, dtype=like.dtype, device=like.device)


def summed_summaries(
    family: ClosedFormFamily,
    weights: torch.Tensor,
    rows: Callable[[int], torch.Tensor],
    count: int,
    eps: float,
) -> Params:
    """``family.weighted_summary_sums`` over ``count`` clients in blocks of :data:`BLOCK`;
    ``rows(s)`` gives the ``m_i`` of the block starting at client ``s``, ``eps^2`` is every
    client's variance. (The iso / diag families form the sums from ``m_i`` directly,
    without per-client summary temporaries.)"""
    var = weights.new_tensor(eps**2)
    sums: Params = {}
    for s in range(0, count, BLOCK):
        part = family.weighted_summary_sums(weights[s : s + BLOCK], rows(s), var)
        sums = {k: sums[k] + v for k, v in part.items()} if sums else part
    return sums


def _round_record(server_round: int, clients: Sequence[Any], failed: Sequence[Any]) -> Dict:
    """A round's record before the update: ``updated`` is set once it happens."""
    return {
        "round": server_round,
        "clients": list(clients),
        "failed": list(failed),
        "updated": False,
    }


def _enough_clients(server_round: int, clients: Sequence[Any], min_clients: int) -> bool:
    """Whether ``clients`` are enough to update ``q(phi)``; warns (the core's
    :class:`~hbfl_pyro.ClientFailureWarning`) when they are not."""
    if len(clients) >= min_clients:
        return True
    # (Imported here: hbfl_pyro.server imports this package.)
    from ..server import ClientFailureWarning

    warnings.warn(
        f"round {server_round}: only {len(clients)} client(s) in the sums "
        f"(min_clients={min_clients}); q(phi) is not updated this round",
        ClientFailureWarning,
        stacklevel=3,
    )
    return False


class FamilyServer(ServerStrategy):
    """The closed-form server of a family, on weighted sums of the clients' summaries (see
    the module docstring).

    A round: :meth:`select` the clients; each gets :meth:`message` (``q(phi)``'s
    parameters) and replies with its mean ``m_i``; :meth:`pool` applies participation,
    :meth:`multiplicities` the weighting, and :meth:`aggregate_sum` sets ``q(phi)`` to the
    server block's exact maximiser from the weighted sums (:meth:`aggregate` does all of
    it from per-client replies).

    :param family: the closed-form family (its ``server_update`` is the update).
    :param client_names: every client's name (the deep trainers use their indices).
    :param eps: the clients' known scale, ``q_i = N(m_i, eps^2 I)``.
    :param participation: ``"scaled"`` (the round's sums times ``N / |S|``) or
        ``"stale"`` (every client's latest ``m_i``).
    :param weighting: ``"equal"`` or ``"size"`` (:func:`client_multiplicities`).
    :param sizes: every client's training-set size (needed for ``"size"``).
    :param fraction: the fraction of clients sampled per round.
    :param min_clients: fewest clients for the server to update.
    :param seed: the run's seed.

    Example::

        >>> import torch
        >>> from hbfl_pyro import NIWIso
        >>> server = FamilyServer(NIWIso(2, lambda0=1e-3), ["a", "b"], eps=0.1)
        >>> replies = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([3.0, 2.0])}
        >>> record = server.aggregate(1, replies)
        >>> record["updated"], [round(v, 3) for v in server.family_params["m0"].tolist()]
        (True, [1.999, 1.0])
    """

    mode = "closed_form"

    client_names: List[Any]

    def __init__(
        self,
        family: ClosedFormFamily,
        client_names: Sequence[Any],
        *,
        eps: float = 0.0,
        participation: str = "scaled",
        weighting: str = "equal",
        sizes: Optional[Sequence[int]] = None,
        fraction: float = 1.0,
        min_clients: int = 1,
        seed: int = 0,
    ):
        check_participation(participation)
        if weighting not in WEIGHTING:
            raise ValueError(f"weighting must be 'equal' or 'size', got {weighting!r}")
        if weighting == "size" and (sizes is None or len(sizes) != len(client_names)):
            raise ValueError("weighting='size' needs every client's training-set size")
        self.family = family
        self.client_names = list(client_names)
        self.eps = float(eps)
        self.participation, self.weighting = participation, weighting
        self.sizes = list(sizes) if sizes is not None else [1] * len(self.client_names)
        self.fraction, self.min_clients, self.seed = fraction, int(min_clients), seed
        self.family_params: Params = family.init_params()
        #: Each client's latest reply under ``participation="stale"`` (empty otherwise).
        self.stale: Dict[Any, torch.Tensor] = {}
        # Indices 0..N-1 name themselves (the deep trainers'); other names are looked up.
        indices = self.client_names == list(range(self.num_clients))
        self._names: Optional[List[Any]] = None if indices else self.client_names

    # ------------------------------------------------------------------ configure
    def message(self, server_round: int, client) -> Dict:
        """What ``client`` is sent: the round, the mode, its seed and ``q(phi)``'s
        parameters (copies)."""
        return {
            "round": server_round,
            "mode": self.mode,
            "seed": derive_seed(self.seed, server_round, client),
            "family_params": {k: v.detach().clone() for k, v in self.family_params.items()},
        }

    # ------------------------------------------------------------------ aggregate
    def pool(self, replies: Dict[Any, torch.Tensor]) -> Dict[Any, torch.Tensor]:
        """The replies this round's sums run over
        (:func:`~hbfl_pyro.participation.pool_replies`): the round's under ``"scaled"``,
        every client's latest under ``"stale"`` (kept in :attr:`stale`; a reply is kept as
        given, so pass copies of tensors that will change)."""
        return pool_replies(self.participation, self.stale, replies)

    def multiplicities(self, pool: Sequence[Any], like: torch.Tensor) -> torch.Tensor:
        """Each pooled client's multiplicity (:func:`client_multiplicities`), summing to
        ``N``: the weights of the sums :meth:`aggregate_sum` takes."""
        return client_multiplicities(
            pool, self.sizes, self.num_clients, self.weighting, like, self._names
        )

    def aggregate(
        self, server_round: int, replies: Dict[Any, Any], failed: Sequence[Any] = ()
    ) -> Dict:
        """Update ``q(phi)`` from per-client replies ``{client: m_i}``: pool, weigh, sum
        (:func:`summed_summaries`) and :meth:`aggregate_sum`; returns the round's record."""
        stale = self.participation == "stale"
        pooled = self.pool({i: m.clone() if stale else m for i, m in replies.items()})
        pool = sorted(pooled)  # the trainers' order: the sums are bit-for-bit theirs
        if not pool:
            return self.aggregate_sum(server_round, {}, [], failed)
        like = pooled[pool[0]]
        w = self.multiplicities(pool, like)

        def rows(s):
            return torch.stack([pooled[i] for i in pool[s : s + BLOCK]])

        sums = summed_summaries(self.family, w, rows, len(pool), self.eps)
        total = {f"stats/{k}": v for k, v in sums.items()}
        return self.aggregate_sum(server_round, total, pool, failed)

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """The family's summary entries (``stats/<key>``) and their shapes: what
        :meth:`aggregate_sum` needs of the replies, summed with :meth:`multiplicities`."""
        zeros = torch.zeros(int(getattr(self.family, "d", 1)))
        cov = torch.diag(zeros) if self.family.covariance == "full" else zeros
        summary = self.family.client_summary(zeros, cov)
        return {f"stats/{k}": tuple(v.shape) for k, v in sorted(summary.items())}

    def aggregate_sum(
        self,
        server_round: int,
        total: Dict[str, torch.Tensor],
        clients: Sequence[Any],
        failed: Sequence[Any] = (),
    ) -> Dict:
        """Set ``q(phi)`` to the server block's exact maximiser (``family.server_update``)
        from ``total``: the sums over the pooled ``clients`` of their summaries (entries
        ``stats/<key>``), each weighted by its :meth:`multiplicities`, so that they stand
        for all ``N`` clients (no further scaling here, unlike
        :meth:`hbfl_pyro.server.ClosedFormServer.aggregate_sum`, whose sums are
        unweighted). Returns the round's record (round,
        clients, failed, updated)."""
        record = _round_record(server_round, clients, failed)
        if not _enough_clients(server_round, clients, self.min_clients):
            return record
        sums = {p.split("/", 1)[1]: v for p, v in total.items() if p.startswith("stats/")}
        self.family_params = self.family.server_update(sums, self.num_clients)
        record["updated"] = True
        return record

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """``{"mode", "family_params", "stale"}`` (copies), the core closed-form server's
        layout."""
        return {
            "mode": self.mode,
            "family_params": {k: v.clone() for k, v in self.family_params.items()},
            "stale": copy.deepcopy(self.stale),
        }

    def check_state(self, state: Dict) -> None:
        """Raise ``ValueError`` unless ``state`` is a closed-form state of this family's
        shapes."""
        if not isinstance(state, dict) or state.get("mode") != self.mode:
            got = state.get("mode") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {self.mode!r} server state (mode {got!r})")
        want = {k: tuple(v.shape) for k, v in self.family_params.items()}
        got_shapes = {k: tuple(v.shape) for k, v in state["family_params"].items()}
        if want != got_shapes:
            raise ValueError(
                f"the state's family parameters {got_shapes} differ from this server's {want}"
            )

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a state written by :meth:`state_dict`."""
        self.check_state(state)
        self.family_params = {k: v.clone() for k, v in state["family_params"].items()}
        self.stale = copy.deepcopy(state["stale"])


class MixtureServer(ServerStrategy):
    """The closed-form server of a mixture of ``K`` families (method.md §6): component
    ``k``'s ``q(mu_k, Sigma_k)`` is its family's exact update from the clients' summaries
    weighted by ``w_i r_ik`` (``r_i`` a client's responsibilities, ``w_i`` its
    :meth:`multiplicities`), standing for ``N_k = N sum_i w_i r_ik / sum_i w_i`` clients,
    and ``q(pi) = Dirichlet(alpha0 + N_k)``. A client's reply is ``(m_i, r_i)``.

    As :class:`FamilyServer`: :meth:`pool` (participation, the stale pool keeps each
    client's latest ``(m_i, r_i)``), :meth:`multiplicities` (weighting), and the update
    from weighted sums (:meth:`aggregate_sum`) or per-client replies (:meth:`aggregate`).
    The deep mixture (:class:`~hbfl_pyro.deep.FedHBMixture`) holds one; with ``K = 1``
    it is :class:`FamilyServer`'s update.

    :param families: the ``K`` closed-form families.
    :param client_names: every client's name.
    :param alpha0: the Dirichlet prior's concentration per component.
    :param alpha: the initial ``q(pi)`` concentrations ``(K,)`` (default ``alpha0`` each,
        in the first family's ``mu0`` dtype).
    :param kwargs: ``eps``, ``participation``, ``weighting``, ``sizes``, ``fraction``,
        ``min_clients``, ``seed`` as :class:`FamilyServer`'s.
    """

    mode = "closed_form_mixture"

    client_names: List[Any]

    def __init__(
        self,
        families: Sequence[ClosedFormFamily],
        client_names: Sequence[Any],
        *,
        alpha0: float = 1.0,
        alpha: Optional[torch.Tensor] = None,
        eps: float = 0.0,
        participation: str = "stale",
        weighting: str = "equal",
        sizes: Optional[Sequence[int]] = None,
        fraction: float = 1.0,
        min_clients: int = 1,
        seed: int = 0,
    ):
        if not families:
            raise ValueError("families is empty: a mixture needs K >= 1 families")
        # The components share everything but the family: one FamilyServer's checks and
        # weighting (its own q(phi) is not used).
        self._shared = FamilyServer(
            families[0],
            client_names,
            eps=eps,
            participation=participation,
            weighting=weighting,
            sizes=sizes,
            fraction=fraction,
            min_clients=min_clients,
            seed=seed,
        )
        self.families = list(families)
        self.client_names = self._shared.client_names
        self.eps, self.alpha0 = float(eps), float(alpha0)
        self.participation, self.weighting = participation, weighting
        self.fraction, self.min_clients, self.seed = fraction, int(min_clients), seed
        self.family_params: List[Params] = [f.init_params() for f in self.families]
        if alpha is None:
            alpha = self.family_params[0]["m0"].new_full((len(self.families),), self.alpha0)
        self.alpha: torch.Tensor = alpha
        #: Each client's latest ``(m_i, r_i)`` under ``participation="stale"``.
        self.stale: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def K(self) -> int:
        return len(self.families)

    def message(self, server_round: int, client) -> Dict:
        """The round, the mode, the client's seed, every component's parameters and
        ``q(pi)``'s concentrations (copies)."""
        return {
            "round": server_round,
            "mode": self.mode,
            "seed": derive_seed(self.seed, server_round, client),
            "family_params": [
                {k: v.detach().clone() for k, v in p.items()} for p in self.family_params
            ],
            "alpha": self.alpha.detach().clone(),
        }

    def pool(self, replies: Dict[Any, Tuple[torch.Tensor, torch.Tensor]]) -> Dict:
        """As :meth:`FamilyServer.pool`, for ``(m_i, r_i)`` replies."""
        return pool_replies(self.participation, self.stale, replies)

    def multiplicities(self, pool: Sequence[Any], like: torch.Tensor) -> torch.Tensor:
        """As :meth:`FamilyServer.multiplicities`."""
        return self._shared.multiplicities(pool, like)

    def aggregate(
        self, server_round: int, replies: Dict[Any, Any], failed: Sequence[Any] = ()
    ) -> Dict:
        """Update every component and ``q(pi)`` from per-client replies
        ``{client: (m_i, r_i)}``; returns the round's record (with ``counts``, ``N_k``)."""
        stale = self.participation == "stale"
        pooled = self.pool({i: (m.clone() if stale else m, r) for i, (m, r) in replies.items()})
        pool = sorted(pooled)
        if not pool:
            return self.aggregate_sum(server_round, {}, [], failed)
        resp = torch.stack([pooled[i][1] for i in pool])
        w = self.multiplicities(pool, resp)

        def rows(s):
            return torch.stack([pooled[i][0] for i in pool[s : s + BLOCK]])

        total = self.weighted_sums(w, resp, rows, len(pool))
        return self.aggregate_sum(server_round, total, pool, failed)

    def weighted_sums(
        self,
        w: torch.Tensor,
        resp: torch.Tensor,
        rows: Callable[[int], torch.Tensor],
        count: int,
    ) -> Dict[str, torch.Tensor]:
        """What :meth:`aggregate_sum` takes, from ``count`` clients' multiplicities ``w``,
        responsibilities ``resp`` ``(C, K)`` and means (``rows(s)``: the block starting at
        ``s``, :func:`summed_summaries`): ``weight`` (``sum_i w_i``),
        ``component<k>/weight`` (``sum_i w_i r_ik``) and ``component<k>/stats/<key>``."""
        total: Dict[str, torch.Tensor] = {"weight": w.sum()}
        for k, fam in enumerate(self.families):
            wk = w * resp[:, k]
            total[f"component{k}/weight"] = wk.sum()
            for key, value in summed_summaries(fam, wk, rows, count, self.eps).items():
                total[f"component{k}/stats/{key}"] = value
        return total

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """Per component, the family's summary entries and the weight; and the total
        weight (see :meth:`weighted_sums`)."""
        layout: Dict[str, Tuple[int, ...]] = {"weight": ()}
        for k, fam in enumerate(self.families):
            layout[f"component{k}/weight"] = ()
            for path, shape in (
                FamilyServer(fam, self.client_names).sum_layout(server_round).items()
            ):
                layout[f"component{k}/{path}"] = shape
        return layout

    def aggregate_sum(
        self,
        server_round: int,
        total: Dict[str, torch.Tensor],
        clients: Sequence[Any],
        failed: Sequence[Any] = (),
    ) -> Dict:
        """Set every component to its family's exact update from its weighted sums,
        standing for ``N_k = N * component<k>/weight / weight`` clients (exactly ``N``
        when ``K = 1``: ``x / x = 1``), and ``q(pi)`` to ``Dirichlet(alpha0 + N_k)``.
        Returns the round's record, with ``counts`` (``N_k``) when updated."""
        record = _round_record(server_round, clients, failed)
        if not _enough_clients(server_round, clients, self.min_clients):
            return record
        weight = total["weight"]
        counts = torch.stack(
            [self.num_clients * (total[f"component{k}/weight"] / weight) for k in range(self.K)]
        )
        params = []
        for k, fam in enumerate(self.families):
            prefix = f"component{k}/stats/"
            sums = {p[len(prefix) :]: v for p, v in total.items() if p.startswith(prefix)}
            params.append(fam.server_update(sums, counts[k]))
        self.family_params = params
        self.alpha = self.alpha0 + counts
        record["updated"] = True
        record["counts"] = counts
        return record

    def state_dict(self) -> Dict:
        """``{"mode", "family_params" (a list), "alpha", "stale"}`` (copies)."""
        return {
            "mode": self.mode,
            "family_params": [{k: v.clone() for k, v in p.items()} for p in self.family_params],
            "alpha": self.alpha.clone(),
            "stale": copy.deepcopy(self.stale),
        }

    def check_state(self, state: Dict) -> None:
        """Raise ``ValueError`` unless ``state`` is a mixture state of these families'
        shapes."""
        if not isinstance(state, dict) or state.get("mode") != self.mode:
            got = state.get("mode") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {self.mode!r} server state (mode {got!r})")
        want = [{k: tuple(v.shape) for k, v in p.items()} for p in self.family_params]
        got_shapes = [{k: tuple(v.shape) for k, v in p.items()} for p in state["family_params"]]
        if want != got_shapes:
            raise ValueError(
                f"the state's component parameters {got_shapes} differ from this server's {want}"
            )

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a state written by :meth:`state_dict`."""
        self.check_state(state)
        self.family_params = [{k: v.clone() for k, v in p.items()} for p in state["family_params"]]
        self.alpha = state["alpha"].clone()
        self.stale = copy.deepcopy(state["stale"])


__all__ = ["BLOCK", "FamilyServer", "MixtureServer", "client_multiplicities", "summed_summaries"]
