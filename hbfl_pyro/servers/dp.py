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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..dp import PUBLIC_KEYS, DPConfig
from .base import ServerStrategy

if TYPE_CHECKING:
    from ..server import Server


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


__all__ = ["DifferentialPrivacy"]
