"""Differential privacy as a wrapper around a first-order server strategy.

:class:`DifferentialPrivacy` takes a :class:`~hbfl_pyro.server.Server` (closed-form or
gradient mode) and a :class:`~hbfl_pyro.dp.DPConfig`, and owns everything DP: the check
of each reply's public count, the re-clipping, the Gaussian noise on the round's sum, the
count of releases and the ``epsilon``/``delta`` in each round's record and checkpoint.
Everything else (selection, messages, the update, the mode) is the wrapped server's. The
shape follows Flower's ``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``, with
one difference: Flower noises the aggregated model the inner strategy returns, whereas
here the noise goes on the *sum* of the replies, which the wrapped server then only scales
and post-processes (:mod:`hbfl_pyro.dp` explains the mechanism and the accounting).

A round runs :meth:`Server.gather <hbfl_pyro.server.Server.gather>` (the wrapped server's
checks and its participation pool), forms the noisy sum here, then
:meth:`Server.update <hbfl_pyro.server.Server.update>`: the wrapped server never sees an
un-noised sum.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, cast

import torch

from ..dp import PUBLIC_KEYS, DPConfig, project_moments
from .base import ServerStrategy

if TYPE_CHECKING:
    from ..server import Server
    from .closed_form import FamilyServer


#: Why the deep mixture has no differential privacy (yet), and what to use instead.
MIXTURE_REASON = (
    "a client's responsibilities r_i weigh its summary in every component's sums and set "
    "q(pi) (N_k), so a private round would have to clip each component's update about its "
    "own centre and noise (r_i, r_ik u_ik, r_ik u_ik^2 / C) jointly, with the noisy weights "
    "projected onto counts; and its records publish every client's r_i, and cluster_rounds "
    "/ hold_rounds group clients by their individual updates. None of this is implemented: "
    "use FedHB(..., dp=...) with one family (iso_prior or diag_prior) for a private run"
)

#: Why stale participation has no differential privacy (yet), and what to use instead.
STALE_REASON = (
    "a stale pool re-releases every client's latest reply each round, clipped about the "
    "mean m0 of the round it was sent in, so the sums' cross term 2 sum_i w_i m0^(r_i) u_i "
    "is not a function of one noised sum of the updates. A correct release would noise the "
    "sums of each group of replies clipped about the same m0 (one Gaussian release per "
    "round: a client is in one group; the accountant's count of every round already pays "
    "for each re-release, as no amplification by sampling is claimed), at sqrt(groups) "
    "times the noise on the total; it is not implemented. Use participation='scaled'"
)


def _first_moments(strategy: FamilyServer) -> bool:
    """Whether the family's summaries are ``(sum_m, count)`` alone (FedProx's family: a
    fixed covariance, no second moment), so the release is ``sum_i w_i u_i`` alone."""
    return set(strategy.sum_layout(0)) == {"stats/sum_m", "stats/count"}


class DifferentialPrivacy(ServerStrategy):
    """Client-level differential privacy around a first-order server: its replies are
    re-clipped and Gaussian noise is added to each round's sum before the server's update.

    Each round's record gains the run's ``epsilon`` and ``delta`` so far, and its ``elbo``
    is NaN (clients send none under DP). :meth:`state_dict` is the wrapped server's plus
    ``dp_releases`` and ``dp_accounting``; a checkpoint without them, or written with
    another noise multiplier or accountant, is refused (epsilon would be misreported).
    Attributes not defined here (``stale``, ``family_params``, ``global_guide``,
    ``halve_step``, ...) are read from the wrapped server.

    :param strategy: the wrapped :class:`~hbfl_pyro.server.Server`.
    :param dp: the :class:`~hbfl_pyro.dp.DPConfig` (clip, noise multiplier, accountant).
    :ivar dp_releases: rounds that released a noisy sum (what the accountant counts).

    Example (what ``FederatedSVI(..., dp=cfg)`` builds)::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import DPConfig, FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(i + 0.5)} for i in range(3)}
        >>> cfg = DPConfig(clip=5.0, noise_multiplier=2.0)
        >>> fit = FederatedSVI(model, clients, local_steps=2, seed=0, dp=cfg)
        >>> fit.server
        DifferentialPrivacy(ClosedFormServer, clip=5.0, noise_multiplier=2.0)
        >>> record = fit.step()
        >>> fit.server.dp_releases, record["epsilon"] == cfg.epsilon(1)
        (1, True)
    """

    def __init__(self, strategy: Server, dp: DPConfig):
        from ..server import Server  # here: hbfl_pyro.server imports this module

        if not isinstance(dp, DPConfig):
            raise TypeError(f"dp must be a hbfl_pyro.dp.DPConfig, got {type(dp).__name__}")
        from .closed_form import FamilyServer

        if isinstance(strategy, FamilyServer):
            raise TypeError(
                "a FamilyServer (deep FedHB's) replies with means, clipped about the mean "
                "each client was sent: wrap it in FamilyDifferentialPrivacy, or build "
                "FedHB(..., dp=...)"
            )
        if not isinstance(strategy, Server):
            mode = getattr(strategy, "mode", type(strategy).__name__)
            raise TypeError(
                f"differential privacy needs clipped first-order replies, which the {mode} "
                "server does not take (a Hessian's sensitivity has no useful bound): use "
                "server='gradient' or a closed-form server"
            )
        self.strategy = strategy
        self.dp = dp
        self.dp_releases = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.strategy).__name__}, clip={self.dp.clip!r}, "
            f"noise_multiplier={self.dp.noise_multiplier!r})"
        )

    #: The wrapper's own attributes; every other attribute is the wrapped server's.
    OWN = frozenset({"strategy", "dp", "dp_releases"})

    def __getattr__(self, name: str) -> Any:
        # Only called for names this object lacks. Dunder names and "strategy" itself are
        # not forwarded: copy and pickle probe them on an object whose __init__ never ran.
        if name.startswith("__") or name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Reads of the wrapped server's attributes are forwarded (__getattr__), so writes
        # are too: `fit.server.family_params = x` on a DP fit must change the server's
        # q(phi), not leave it untouched behind a new attribute of the wrapper.
        wrapped = self.__dict__.get("strategy")
        if wrapped is not None and name not in self.OWN and not hasattr(type(self), name):
            setattr(wrapped, name, value)
            return
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ delegated
    @property
    def mode(self) -> str:  # type: ignore[override]  # read-only: the wrapped server's
        return self.strategy.mode

    @property
    def done(self) -> bool:
        return self.strategy.done

    @done.setter
    def done(self, value: bool) -> None:
        self.strategy.done = value

    def select(self, server_round: int) -> List[str]:
        return self.strategy.select(server_round)

    def message(self, server_round: int, client: str) -> Dict:
        return self.strategy.message(server_round, client)

    # ------------------------------------------------------------------ aggregate
    def aggregate(
        self, server_round: int, replies: Dict[str, Dict], failed: Sequence[str] = ()
    ) -> Dict:
        """The wrapped server's round, with the noisy sum of its pool in place of the sum."""
        server = self.strategy
        _, key = server.expected_reply()
        screen = self._public_count_problem if key == "stats" else None
        record, pool = server.gather(server_round, replies, failed, screen=screen)
        if pool is not None:
            # Noise on the unscaled sum; scaling and the update are post-processing.
            self.dp.check_round(self.dp_releases + 1)  # also where no FederatedSVI drives
            seed = self.dp.noise_seed(server.seed, server_round)
            noisy = self.dp.noisy_sum([r[key] for r in pool.values()], seed)
            self.dp_releases += 1
            record = server.update(server_round, record, pool, noisy)
            record["elbo"] = float("nan")  # clients send no ELBO under DP
        record["epsilon"] = self.dp.epsilon(self.dp_releases)
        record["delta"] = self.dp.delta
        return record

    @staticmethod
    def _public_count_problem(reply: Dict) -> Optional[str]:
        """A closed-form reply's public ``count`` must be exactly 1 (it is neither clipped
        nor noised); checked in the server's pass over the replies so that such a reply is
        left out with a warning naming the client, before it could enter the stale pool."""
        for name in PUBLIC_KEYS:
            if name in reply["stats"] and not bool((reply["stats"][name] == 1).all()):
                return f"its public {name!r} is not 1, which differential privacy requires"
        return None

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """Refused: under secure aggregation the server could not re-clip each reply, so the
        sensitivity would rest on every client clipping honestly."""
        raise NotImplementedError(
            "secure aggregation with differential privacy (dp=) is not supported yet: "
            "the server would have to add its noise to the secure sum; turn one off"
        )

    def aggregate_sum(
        self,
        server_round: int,
        total: Dict[str, torch.Tensor],
        clients: Sequence[str],
        failed: Sequence[str] = (),
    ) -> Dict:
        self.sum_layout(server_round)  # raises, saying why
        raise AssertionError("sum_layout refuses every round")

    # ------------------------------------------------------------------ accounting
    def report(self) -> Dict:
        """The privacy of the rounds so far (:meth:`hbfl_pyro.dp.DPConfig.report`)."""
        return self.dp.report(self.dp_releases)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """The wrapped server's state plus the account (one flat dict, as checkpoints of
        DP runs have always been)."""
        state = self.strategy.state_dict()
        state["dp_releases"] = self.dp_releases
        state["dp_accounting"] = self._accounting()
        return state

    def check_state(self, state: Dict) -> None:
        """The wrapped server's checks, then: the checkpoint's rounds were noised, with this
        noise multiplier and accountant."""
        self.strategy.check_state(state)
        if "dp_releases" not in state:
            raise ValueError(
                "the checkpoint is of a run without differential privacy: its rounds were "
                "released without noise, so no epsilon holds for a continuation; start afresh"
            )
        if "dp_accounting" in state:
            z, accountant = state["dp_accounting"]
            if (z, accountant) != self._accounting():
                raise ValueError(
                    f"the checkpoint's rounds ran with noise multiplier {z:g} ({accountant} "
                    f"accountant); this run's DPConfig has {self.dp.noise_multiplier:g} "
                    f"({self.dp.accountant}): epsilon would be misreported. Resume with the "
                    "same DPConfig, or start a new run"
                )

    def _accounting(self) -> Tuple[float, str]:
        """What epsilon depends on besides the rounds: ``(noise multiplier, accountant)``."""
        z = self.dp.noise_multiplier  # set by DPConfig, given or solved for a target
        return float(z if z is not None else math.nan), self.dp.accountant

    def load_state_dict(self, state: Dict) -> None:
        self.check_state(state)
        self.strategy.load_state_dict(state)
        self.dp_releases = state["dp_releases"]


class FamilyDifferentialPrivacy(DifferentialPrivacy):
    """Client-level differential privacy around a
    :class:`~hbfl_pyro.servers.closed_form.FamilyServer` (deep FedHB, FedAvg and FedProx as
    its families): what :class:`DifferentialPrivacy` is to the core's servers, with the
    clipping a network's reply needs. ``FedHB(..., dp=cfg)`` builds it.

    **Mechanism.** A client's reply is its mean ``m_i``; the private quantity is its update
    ``u_i = m_i - m0`` about the global mean ``m0`` it was sent, clipped to
    ``||u_i|| <= C`` (``C = dp.clip``): :meth:`clip_updates`, run by the client before it
    replies and again here (a no-op for an honest client). The family's sums over the
    round's clients, ``sum_m = W m0 + sum_i w_i u_i`` and ``sum_mm = W m0^2 + 2 m0 sum_i
    w_i u_i + sum_i w_i u_i^2 + W eps^2`` (``w_i`` the multiplicities, ``W`` their sum;
    the isotropic family sums ``||.||^2`` instead of ``.^2``), depend on the data only
    through the vector ``sum_i w_i v_i`` with ``v_i = (u_i, u_i^2 / C)``, whose norm is at
    most ``sqrt(2) C`` (``||u^2|| <= ||u||^2``). Gaussian noise of standard deviation
    ``z sqrt(2) C max_i w_i`` on every coordinate of that vector (``z`` the noise
    multiplier) is a ``1 / z``-GDP release per round, so :meth:`DPConfig.epsilon
    <hbfl_pyro.dp.DPConfig.epsilon>` of the rounds released is the run's epsilon, exactly
    as for the core. Here the noise goes on the sums directly (``sum_m + n_1``, ``sum_mm +
    2 m0 n_1 + C n_2``: the same release, post-processed with the public ``m0``), the
    noisy moments are projected onto feasible ones (:func:`~hbfl_pyro.dp.project_moments`)
    and the server's update reads nothing else. With ``noise_multiplier=0`` and a clip no
    update reaches, the run is the non-private one bit for bit.

    **Adjacency and what is public** (as :mod:`hbfl_pyro.dp`): one client's update replaced
    by zero (a client that did not move); the roster, ``m0`` and, with
    ``weighting="size"``, the clients' training-set sizes (the server weighs by them) are
    public; the noise is calibrated to the largest multiplicity in the round.

    **FedAvg and FedProx** (:class:`~hbfl_pyro.deep.FedProxFamily`, whose summaries have no
    second moment): the release is ``sum_i w_i u_i`` alone, of sensitivity ``C`` per unit
    multiplicity, and the noise ``z C max_i w_i`` goes on ``sum_m`` only: DP-FedAvg
    (McMahan et al. 2018) with the same clipping, accounting and state.

    **Refused** (the errors say why, :data:`STALE_REASON` and :data:`MIXTURE_REASON`):
    ``participation="stale"`` (the pool's replies were clipped about the means of the
    rounds they were sent in, so the cross term ``2 sum_i w_i m0^(r_i) u_i`` of the second
    moments is not a function of one noised sum; noising each group of replies clipped
    about the same mean would be correct and is not implemented; use ``"scaled"``); the
    full-covariance family (its ``d x d`` second moment; use ``NIWIso`` or ``NIWDiag``);
    the mixture's server; secure aggregation (the server could not re-clip each update).

    :param strategy: the wrapped :class:`~hbfl_pyro.servers.closed_form.FamilyServer`.
    :param dp: the :class:`~hbfl_pyro.dp.DPConfig`.
    :ivar dp_releases: rounds that released noisy sums (what the accountant counts).

    Example::

        >>> import torch
        >>> from hbfl_pyro import DPConfig, NIWIso
        >>> from hbfl_pyro.servers import FamilyDifferentialPrivacy, FamilyServer
        >>> cfg = DPConfig(clip=0.5, noise_multiplier=1.0, reproducible_noise=True)
        >>> server = FamilyDifferentialPrivacy(FamilyServer(NIWIso(2), ["a", "b"], eps=0.1), cfg)
        >>> replies = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.1, 0.0])}
        >>> server.clip_updates(replies["a"][None], torch.zeros(2))  # norm 5 -> 0.5
        tensor([[0.3000, 0.4000]])
        >>> record = server.aggregate(1, replies)
        >>> server.dp_releases, record["epsilon"] == cfg.epsilon(1)
        (1, True)
    """

    def __init__(self, strategy: FamilyServer, dp: DPConfig):
        from ..families.niw import NIWDiag, NIWIso
        from .closed_form import FamilyServer

        if not isinstance(dp, DPConfig):
            raise TypeError(f"dp must be a hbfl_pyro.dp.DPConfig, got {type(dp).__name__}")
        if not isinstance(strategy, FamilyServer):
            mode = getattr(strategy, "mode", type(strategy).__name__)
            raise TypeError(
                f"FamilyDifferentialPrivacy wraps a FamilyServer (deep FedHB), not the {mode} "
                "server: wrap the core's Server in DifferentialPrivacy. The deep mixture has "
                "no differential privacy yet: " + MIXTURE_REASON
            )
        if strategy.participation == "stale":
            raise ValueError(
                "differential privacy of a deep FedHB run needs participation='scaled' for "
                "now: " + STALE_REASON
            )
        if not (isinstance(strategy.family, (NIWIso, NIWDiag)) or _first_moments(strategy)):
            raise ValueError(
                f"differential privacy of a deep FedHB run needs an NIWIso or NIWDiag family, "
                f"or FedProx's (got {type(strategy.family).__name__}: its summaries are not "
                "sums of a clipped update and its square; NIWFull's is a d x d second moment "
                "per client); use iso_prior or diag_prior"
            )
        self.strategy = strategy  # type: ignore[assignment]  # (the parent wraps a Server)
        self.dp = dp
        self.dp_releases = 0

    @property
    def family_server(self) -> FamilyServer:
        """The wrapped :class:`~hbfl_pyro.servers.closed_form.FamilyServer`."""
        return cast("FamilyServer", self.strategy)

    def message(self, server_round: int, client: Any) -> Dict:
        return self.family_server.message(server_round, client)

    @property
    def sensitivity(self) -> float:
        """The L2 bound of one client's contribution ``(u_i, u_i^2 / C)`` to the released
        vector, per unit multiplicity: ``sqrt(2) C``; ``C`` for a family without second
        moments (FedProx's: the release is ``sum_i w_i u_i`` alone)."""
        if _first_moments(self.family_server):
            return self.dp.clip
        return math.sqrt(2.0) * self.dp.clip

    def clip_updates(self, means: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        """Each row of ``means`` ``(C, d)`` with its update ``m_i - m0`` clipped to norm
        ``dp.clip``: ``m0 + (m_i - m0) clip / ||m_i - m0||`` where the norm exceeds the
        clip; every other row is returned as it is (bit for bit)."""
        update = means - m0
        norm = torch.linalg.vector_norm(update, dim=-1, keepdim=True)
        over = norm > self.dp.clip
        if not bool(over.any()):
            return means
        return torch.where(over, m0 + update * (self.dp.clip / norm), means)

    def aggregate_rows(
        self,
        server_round: int,
        clients: Sequence[Any],
        rows,
        weights: torch.Tensor,
        failed: Sequence[Any] = (),
    ) -> Tuple[Dict, Dict[str, torch.Tensor]]:
        """The round's update from the pooled ``clients``' means (``rows(s)``: the block of
        :data:`~hbfl_pyro.servers.closed_form.BLOCK` clients starting at ``s``) and their
        multiplicities ``weights``: re-clip, sum in blocks, add the noise, update.

        :returns: the round's record (with ``epsilon`` and ``delta``) and the noisy sums the
            update read (``{}`` when fewer than ``min_clients`` were pooled: no release).
        """
        from .closed_form import summed_summaries

        server = self.family_server
        if len(clients) < server.min_clients:
            record = server.aggregate_sum(server_round, {}, clients, failed)  # warns
            return self._account(record), {}
        self.dp.check_round(self.dp_releases + 1)  # also where no trainer drives
        m0 = server.family_params["m0"]  # the mean this round's clients were sent

        def clipped(s):
            return self.clip_updates(rows(s), m0)

        sums = summed_summaries(server.family, weights, clipped, len(clients), server.eps)
        if self.dp.multiplier > 0:
            seed = self.dp.noise_seed(server.seed, server_round)
            sums = self._noisy(sums, m0, float(weights.max()), seed)
        self.dp_releases += 1
        total = {f"stats/{k}": v for k, v in sums.items()}
        record = server.aggregate_sum(server_round, total, clients, failed)
        return self._account(record), sums

    def _noisy(
        self, sums: Dict[str, torch.Tensor], m0: torch.Tensor, largest: float, seed: int
    ) -> Dict[str, torch.Tensor]:
        """The sums with the release's noise (see the class doc), projected onto moments
        that clients could have sent."""
        gen = torch.Generator().manual_seed(seed)  # the server's own: global RNG untouched
        std = self.dp.multiplier * self.sensitivity * largest
        m = sums["sum_m"]
        first = std * torch.randn(m.shape, generator=gen, dtype=m.dtype).to(m.device)
        noisy = dict(sums)
        noisy["sum_m"] = m + first
        if "sum_mm" not in sums:  # FedProx's family: the release is sum_i w_i u_i alone
            return noisy
        mm = sums["sum_mm"]
        second = std * torch.randn(mm.shape, generator=gen, dtype=mm.dtype).to(mm.device)
        cross = m0 * first if mm.shape == m.shape else (m0 * first).sum(-1)
        noisy["sum_mm"] = mm + 2.0 * cross + self.dp.clip * second
        return project_moments(noisy, sums["count"])  # type: ignore[arg-type]

    def _account(self, record: Dict) -> Dict:
        record["epsilon"] = self.dp.epsilon(self.dp_releases)
        record["delta"] = self.dp.delta
        return record

    def aggregate(
        self, server_round: int, replies: Dict[Any, Any], failed: Sequence[Any] = ()
    ) -> Dict:
        """The wrapped server's :meth:`~hbfl_pyro.servers.closed_form.FamilyServer.aggregate`
        from per-client replies ``{client: m_i}``, privatised (:meth:`aggregate_rows`)."""
        from .closed_form import BLOCK

        server = self.family_server
        pooled = server.pool(dict(replies))
        pool = sorted(pooled)  # the trainer's order
        if not pool:
            return self._account(server.aggregate_sum(server_round, {}, [], failed))
        weights = server.multiplicities(pool, pooled[pool[0]])

        def rows(s):
            return torch.stack([pooled[i] for i in pool[s : s + BLOCK]])

        record, _ = self.aggregate_rows(server_round, pool, rows, weights, failed)
        return record


__all__ = ["DifferentialPrivacy", "FamilyDifferentialPrivacy", "MIXTURE_REASON", "STALE_REASON"]
