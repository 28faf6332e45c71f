"""The server: owns ``q(phi)``, samples clients, and updates from their replies.

Two modes (method.md §3):

- **closed form**: a :class:`~hbfl_pyro.families.base.ClosedFormFamily` solves the
  server block exactly from the sum of the clients' summaries;
- **gradient**: any guide of the global sites; the server adds the gradient of its own
  term ``E_q[log p(phi) - log q(phi)]`` to the clients' gradients of their terms and takes
  an Adam step.

Partial participation: ``"scaled"`` multiplies the sum over the round's clients by
``N / |S|`` (an unbiased estimate of the sum over all clients); ``"stale"`` keeps each
client's latest reply and sums over every client heard from so far (exact at a fixed
point, and the default in closed-form mode). Both are :mod:`hbfl_pyro.participation`'s,
which the deep trainers use too.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pyro
import torch
from pyro import poutine

from .elbo import server_term
from .families.base import ClosedFormFamily
from .guides import private_params
from .participation import check_participation, pool_replies, scale_factor
from .seeding import derive_seed, seeded
from .servers.base import ServerStrategy
from .servers.dp import DifferentialPrivacy
from .structure import ModelStructure, site_distribution, site_value

logger = logging.getLogger("hbfl_pyro")


class ClientFailureWarning(UserWarning):
    """A client's reply was unusable and left out of a round."""


def _problem(reply, expected: Dict[str, torch.Size], key: str) -> Optional[str]:
    """Why a reply is unusable, or ``None``: checked before anything is aggregated."""
    if not isinstance(reply, dict):
        return f"the reply is a {type(reply).__name__}, not a dict"
    elbo = reply.get("elbo")
    if not isinstance(elbo, (int, float)) or not math.isfinite(elbo):
        return f"its ELBO {elbo!r} is not a finite number"
    tensors = reply.get(key)
    if not isinstance(tensors, dict) or set(tensors) != set(expected):
        got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        return f"its {key!r} should hold {sorted(expected)}, got {got}"
    for name, shape in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{key}[{name!r}] should have shape {tuple(shape)}, got {found}"
    # One finiteness check per reply (a call per tensor dominates a round of 1,000
    # clients); the offending tensor is looked for only when there is one.
    if not bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors.values()])).all()):
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                return f"{key}[{name!r}] holds NaN or Inf"
    return None


def _warn_dp_attribute(name: str) -> None:
    warnings.warn(
        f"Server.{name} is deprecated: a server holds no differential-privacy state; a DP "
        f"run's server is a hbfl_pyro.servers.DifferentialPrivacy, whose {name} it is",
        DeprecationWarning,
        stacklevel=3,
    )


class Server(ServerStrategy):
    """The first-order server side of federated SVI; ``Server(...)`` builds a
    :class:`ClosedFormServer` when given a ``family``, else a :class:`GradientServer`.
    Both share client selection, reply checks, participation (``scaled``/``stale``) and the
    state's common part; each defines what it sends (:meth:`_message_params`), what a good
    reply holds (:meth:`expected_reply`) and its update from the sum of the pooled replies
    (:meth:`_update`). A round is :meth:`gather` (checks and the pool) then :meth:`update`
    (from the pool's sum): :class:`~hbfl_pyro.servers.dp.DifferentialPrivacy` puts its
    noise between the two, so the server itself holds no privacy code.

    :param client_names: names of all ``N`` clients.
    :param model: the Pyro model (run only on a data-free placeholder).
    :param structure: the model's site roles.
    :param placeholder: the placeholder model input (schema only).
    :param global_guide: ``q(phi)`` in gradient mode, else ``None``.
    :param family: the closed-form family, else ``None``.
    :param fraction: fraction of clients sampled per round.
    :param min_clients: fewest good replies for the server to update.
    :param participation: ``"scaled"`` or ``"stale"``.
    :param lr: Adam learning rate (gradient mode).
    :param lr_decay: multiplicative learning-rate decay per round (gradient mode).
    :param num_particles: particles for the server term's gradient.
    :param seed: the run's seed.
    :param dp: deprecated: ``Server(..., dp=cfg)`` returns the server wrapped in
        :class:`~hbfl_pyro.servers.dp.DifferentialPrivacy` (``DifferentialPrivacy(Server(...),
        cfg)``), with a ``DeprecationWarning``; wrap the server yourself instead.
    """

    #: A short name recorded in the report and checkpoints (set by the subclasses).
    mode = "first_order"

    def __new__(cls, *args, dp=None, **kwargs):
        if cls is Server:  # the mode follows from the arguments, as it always did
            family = (
                kwargs["family"] if "family" in kwargs else (args[5] if len(args) > 5 else None)
            )
            cls = ClosedFormServer if family is not None else GradientServer
        if dp is not None:
            # The old spelling: DP was part of this class. It now wraps the server, so the
            # object returned is the wrapper (Python then skips __init__, which the wrapped
            # server has had).
            warnings.warn(
                "Server(..., dp=cfg) is deprecated: use "
                "hbfl_pyro.servers.DifferentialPrivacy(Server(...), cfg)",
                DeprecationWarning,
                stacklevel=2,
            )
            return DifferentialPrivacy(cls(*args, **kwargs), dp)
        return super().__new__(cls)

    def __init__(
        self,
        client_names: Sequence[str],
        model: Callable,
        structure: ModelStructure,
        placeholder,
        global_guide=None,
        family: Optional[ClosedFormFamily] = None,
        *,
        fraction: float = 1.0,
        min_clients: int = 1,
        participation: str = "scaled",
        lr: float = 0.05,
        lr_decay: float = 1.0,
        num_particles: int = 8,
        seed: int = 0,
        dp: None = None,  # taken by __new__ (deprecated); None by the time it gets here
    ):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        check_participation(participation)
        per_round = max(1, int(round(fraction * len(client_names))))
        if not 1 <= min_clients <= per_round:
            raise ValueError(
                f"min_clients must be between 1 and the {per_round} client(s) sampled per round "
                f"(fraction={fraction}, {len(client_names)} clients), got {min_clients}"
            )
        self.client_names = list(client_names)
        self.model, self.structure, self.placeholder = model, structure, placeholder
        self.global_guide, self.family = global_guide, family
        self.fraction, self.min_clients = fraction, min_clients
        self.participation = participation
        self.num_particles, self.seed = num_particles, seed
        self.stale: Dict[str, Dict] = {}
        # (round, q(phi)'s state dict) behind that round's messages
        self._round_state: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None
        self.family_params: Optional[Dict[str, torch.Tensor]] = None
        self.optim: Optional[torch.optim.Adam] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.ExponentialLR] = None

    # Deprecated (one release): the DP attributes a server had before DP became a wrapper.
    # A server alone has none; a DP run's are on its DifferentialPrivacy wrapper.
    @property
    def dp(self) -> None:
        """Deprecated: always ``None`` (see :class:`~hbfl_pyro.servers.dp.DifferentialPrivacy`)."""
        _warn_dp_attribute("dp")
        return None

    @property
    def dp_releases(self) -> int:
        """Deprecated: always 0 (see :class:`~hbfl_pyro.servers.dp.DifferentialPrivacy`)."""
        _warn_dp_attribute("dp_releases")
        return 0

    # ------------------------------------------------------------------ configure
    def message(self, server_round: int, client: str) -> Dict:
        """What a client needs of ``q(phi)`` this round."""
        msg = {
            "round": server_round,
            "mode": self.mode,
            "seed": derive_seed(self.seed, server_round, client),
        }
        msg.update(self._message_params(server_round))
        return msg

    def _message_params(self, server_round: int) -> Dict:
        """The mode's part of a message: ``q(phi)``'s parameters."""
        raise NotImplementedError

    # ------------------------------------------------------------------ aggregate
    def aggregate(
        self, server_round: int, replies: Dict[str, Dict], failed: Sequence[str] = ()
    ) -> Dict:
        """Update ``q(phi)`` from the round's replies; returns the round's record."""
        record, pool = self.gather(server_round, replies, failed)
        if pool is None:
            return record
        _, key = self.expected_reply()
        keys = next(iter(pool.values()))[key].keys()
        total = {k: sum(r[key][k] for r in pool.values()) for k in keys}
        return self.update(server_round, record, pool, total)

    def gather(
        self,
        server_round: int,
        replies: Dict[str, Dict],
        failed: Sequence[str] = (),
        screen: Optional[Callable[[Dict], Optional[str]]] = None,
    ) -> Tuple[Dict, Optional[Dict[str, Dict]]]:
        """The first half of :meth:`aggregate`: check the replies, warn about and leave out
        unusable ones, and pool the good ones (``participation``).

        :param screen: a further check of a reply that passed this server's own (why it is
            unusable, or ``None``): a wrapper's, e.g. differential privacy's public count.
        :returns: the round's record so far and the pool, ``{client: reply}``, whose sum
            :meth:`update` takes; the pool is ``None`` (and the record final) when fewer
            than ``min_clients`` replies are good.
        """
        self._round_state = None  # q(phi) changes below
        good, bad = {}, list(failed)
        expected, key = self.expected_reply()
        for name, reply in replies.items():
            problem = _problem(reply, expected, key)
            if problem is None and screen is not None:
                problem = screen(reply)
            if problem is None:
                good[name] = reply
            else:
                bad.append(name)
                warnings.warn(
                    f"round {server_round}: client {name!r} sent an unusable reply ({problem}); "
                    "it is left out of this round",
                    ClientFailureWarning,
                    stacklevel=3,
                )
        record = {
            "round": server_round,
            "clients": sorted(good),
            "failed": sorted(bad),
            "updated": False,
        }
        if len(good) < self.min_clients:
            warnings.warn(
                f"round {server_round}: only {len(good)} good replies (min_clients="
                f"{self.min_clients}); the global factor is not updated this round",
                ClientFailureWarning,
                stacklevel=3,
            )
            record["elbo"] = float("nan")
            return record, None
        return record, pool_replies(self.participation, self.stale, good)

    def update(
        self,
        server_round: int,
        record: Dict,
        pool: Dict[str, Dict],
        total: Dict[str, torch.Tensor],
    ) -> Dict:
        """The second half of :meth:`aggregate`: update ``q(phi)`` from ``total``, the sum
        over the ``pool`` (from :meth:`gather`) of its replies' payloads, times ``N / |pool|``.

        The server reads the pool only for its size and ELBO terms; whatever the sum is (a
        wrapper may have added noise to it) it is all the update sees of the payloads.
        :returns: ``record``, completed.
        """
        scale = scale_factor(self.num_clients, len(pool))
        client_elbo = scale * sum(r["elbo"] for r in pool.values())
        own = self._update(server_round, total, scale)
        record["updated"] = True
        record["elbo"] = own + client_elbo
        return record

    def _update(self, server_round: int, total: Dict[str, torch.Tensor], scale: float) -> float:
        """Update ``q(phi)`` from the pool's summed payloads (times ``scale``); returns the
        server's own ELBO term."""
        raise NotImplementedError

    def halve_step(self) -> bool:
        """Halve the server's step size (the stopping rule's answer to a plateau:
        :mod:`hbfl_pyro.convergence`); ``False`` where there is none (closed form)."""
        return False

    def expected_reply(self) -> Tuple[Dict[str, torch.Size], str]:
        """The names and shapes a good reply's payload carries, and under which key
        (``"stats"`` or ``"grads"``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """A snapshot of the server's state (copies: later rounds do not change it)."""
        state: Dict[str, Any] = {"mode": self.mode, "stale": copy.deepcopy(self.stale)}
        state.update(self._mode_state())
        return state

    def _mode_state(self) -> Dict[str, Any]:
        """The mode's part of :meth:`state_dict` (copies)."""
        raise NotImplementedError

    def _global_params(self) -> Tuple[str, Dict[str, torch.Tensor]]:
        """``(state key, tensors)`` of ``q(phi)``'s parameters, for :meth:`check_state`."""
        raise NotImplementedError

    def check_state(self, state: Dict) -> None:
        """Raise ``ValueError`` unless ``state`` was written by a server like this one."""
        if state.get("mode") != self.mode:
            raise ValueError(
                f"the checkpoint is of a {state.get('mode')!r}-mode server; this run's server "
                f"is in {self.mode!r} mode"
            )
        key, params = self._global_params()
        want = {k: tuple(v.shape) for k, v in params.items()}
        got = {k: tuple(v.shape) for k, v in state[key].items()}
        if want != got:
            raise ValueError(
                f"the checkpoint's global parameters {got} differ from this run's {want}"
            )

    def load_state_dict(self, state: Dict) -> None:
        self.check_state(state)
        self._round_state = None
        self.stale = copy.deepcopy(state["stale"])
        self._load_mode_state(state)

    def _load_mode_state(self, state: Dict) -> None:
        raise NotImplementedError


class ClosedFormServer(Server):
    """Closed-form mode: a :class:`~hbfl_pyro.families.base.ClosedFormFamily` solves the
    server block exactly from the sum of the clients' summaries (see :class:`Server`)."""

    mode = "closed_form"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family_params = self._family().init_params()

    def _family(self) -> ClosedFormFamily:
        """The closed-form family (refused in gradient mode)."""
        if self.family is None:
            raise RuntimeError("a gradient-mode server has no closed-form family")
        return self.family

    def closed_form_params(self) -> Dict[str, torch.Tensor]:
        """The closed-form family's parameters of q(phi) (refused in gradient mode)."""
        if self.family_params is None:
            raise RuntimeError("a gradient-mode server has no family parameters")
        return self.family_params

    def _message_params(self, server_round: int) -> Dict:
        return {
            "family_params": {k: v.detach().clone() for k, v in self.closed_form_params().items()}
        }

    def _update(self, server_round: int, total: Dict[str, torch.Tensor], scale: float) -> float:
        sums = {k: scale * t for k, t in total.items()}
        family = self._family()
        self.family_params = family.server_update(sums, self.num_clients)
        return float(family.neg_kl(self.family_params))

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """Closed form: the clients' summaries (``stats/<key>``) are all the update needs
        of them (see :meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout`); refused
        with stale participation of a sampled fraction."""
        if self.participation == "stale" and self.fraction < 1:
            raise NotImplementedError(
                "participation='stale' keeps each client's latest reply, which secure "
                "aggregation never shows the server; use participation='scaled' or fraction=1"
            )
        shapes, _ = self.expected_reply()
        return {f"stats/{key}": tuple(shape) for key, shape in sorted(shapes.items())}

    def aggregate_sum(
        self,
        server_round: int,
        total: Dict[str, torch.Tensor],
        clients: Sequence[str],
        failed: Sequence[str] = (),
    ) -> Dict:
        """The closed-form update from the round's secure sum (``participation="scaled"``:
        the sums over the round's ``n`` clients times ``N / n``; with every client in the
        round also ``"stale"``'s update); returns the round's record, as :meth:`aggregate`'s.
        """
        self.sum_layout(server_round)  # refuses what cannot run on sums
        self._round_state = None
        record = {
            "round": server_round,
            "clients": sorted(clients),
            "failed": sorted(failed),
            "updated": False,
            "elbo": float("nan"),
        }
        if not clients or len(clients) < self.min_clients:
            warnings.warn(
                f"round {server_round}: only {len(clients)} client(s) in the secure sum "
                f"(min_clients={self.min_clients}); the global factor is not updated this "
                "round",
                ClientFailureWarning,
                stacklevel=2,
            )
            return record
        family = self._family()
        scale = scale_factor(self.num_clients, len(clients))
        sums = {
            path.split("/", 1)[1]: scale * value
            for path, value in total.items()
            if path.startswith("stats/")
        }
        self.family_params = family.server_update(sums, self.num_clients)
        own = float(family.neg_kl(self.family_params))
        record["updated"] = True
        record["elbo"] = own + scale * float(total["elbo"])
        return record

    def expected_reply(self):
        """A summary of ``q_i``'s moments (the family's ``client_summary``)."""
        if not hasattr(self, "_summary_shapes"):
            # The shapes of one client's summary, worked out from the schema alone.
            zeros = torch.zeros(self._local_dim())
            cov = (
                torch.zeros(len(zeros), len(zeros))
                if self._family().covariance == "full"
                else zeros
            )
            summary = self._family().client_summary(zeros, cov)
            self._summary_shapes = {k: v.shape for k, v in summary.items()}
        return self._summary_shapes, "stats"

    def _local_dim(self) -> int:
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
            trace = poutine.trace(self.model).get_trace(self.placeholder)
        family = self._family()
        site = trace.nodes[family.local_site]
        value, event_dim = site_value(site), site_distribution(site).event_dim
        return int(torch.Size(value.shape[value.dim() - event_dim :]).numel())

    def _mode_state(self) -> Dict[str, Any]:
        return {"family_params": {k: v.clone() for k, v in self.closed_form_params().items()}}

    def _global_params(self) -> Tuple[str, Dict[str, torch.Tensor]]:
        return "family_params", self.closed_form_params()

    def _load_mode_state(self, state: Dict) -> None:
        self.family_params = {k: v.clone() for k, v in state["family_params"].items()}


class GradientServer(Server):
    """Gradient mode: any guide of the global sites; the server adds the gradient of its
    own term ``E_q[log p(phi) - log q(phi)]`` to the clients' and takes an Adam step (see
    :class:`Server`)."""

    mode = "gradient"

    def __init__(self, *args, lr: float = 0.05, lr_decay: float = 1.0, **kwargs):
        super().__init__(*args, lr=lr, lr_decay=lr_decay, **kwargs)
        self.optim = torch.optim.Adam(self.global_guide.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optim, gamma=lr_decay)

    def _optimiser(self) -> Tuple[torch.optim.Adam, torch.optim.lr_scheduler.ExponentialLR]:
        """The gradient mode's Adam and its decay (refused in closed-form mode)."""
        if self.optim is None or self.scheduler is None:
            raise RuntimeError("a closed-form server has no optimiser")
        return self.optim, self.scheduler

    def _message_params(self, server_round: int) -> Dict:
        # The guide's state dict is collected once per round (walking the module is the
        # costly part with many clients); every client still gets its own copy.
        if self._round_state is None or self._round_state[0] != server_round:
            state = {k: v.detach() for k, v in self.global_guide.state_dict().items()}
            self._round_state = (server_round, state)
        return {"global_params": {k: v.clone() for k, v in self._round_state[1].items()}}

    def _update(self, server_round: int, total: Dict[str, torch.Tensor], scale: float) -> float:
        with private_params(), seeded(derive_seed(self.seed, server_round, "server")):
            own_term = server_term(
                self.model,
                self.global_guide,
                self.placeholder,
                self.structure,
                self.num_particles,
            )
            optim, scheduler = self._optimiser()
            optim.zero_grad()
            (-own_term).backward()
        for name, param in self.global_guide.named_parameters():
            grad = scale * total[name]
            param.grad = param.grad + grad if param.grad is not None else grad
        bad = [n for n, p in self.global_guide.named_parameters() if not p.grad.isfinite().all()]
        if bad:
            # Refuse the step: q(phi) and the optimiser stay as they were after the last
            # good round, so the run can be checkpointed or continued with other settings.
            raise FloatingPointError(
                f"round {server_round}: the gradient of the ELBO with respect to q(phi)'s "
                f"{', '.join(repr(n) for n in bad)} is NaN or Inf (the fit is diverging); "
                "q(phi) was left at its last good value. Lower server_lr / local_lr, add "
                "particles, or use a simpler global guide"
            )
        optim.step()
        scheduler.step()
        return float(own_term.detach())

    def halve_step(self) -> bool:
        """Halve the server's Adam step size (the stopping rule's answer to a plateau:
        :mod:`hbfl_pyro.convergence`)."""
        optim, _ = self._optimiser()
        for group in optim.param_groups:
            group["lr"] *= 0.5
        return True

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """Refused: gradients are sums too, but their scale is unknown in advance, so no
        public bound for secure aggregation's quantisation holds, and the Adam step would
        need its own error analysis."""
        raise NotImplementedError(
            "secure aggregation runs the closed-form and second-order servers, not gradient "
            "mode (no public bound on the gradients); use a closed-form family "
            "(server='closed_form') or the second-order server"
        )

    def expected_reply(self):
        """Gradients of the client's term with respect to ``q(phi)``'s parameters."""
        return {k: p.shape for k, p in self.global_guide.named_parameters()}, "grads"

    def _mode_state(self) -> Dict[str, Any]:
        optim, scheduler = self._optimiser()
        return {
            "global_guide": {
                k: v.detach().clone() for k, v in self.global_guide.state_dict().items()
            },
            "optim": copy.deepcopy(optim.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()),
        }

    def _global_params(self) -> Tuple[str, Dict[str, torch.Tensor]]:
        return "global_guide", self.global_guide.state_dict()

    def _load_mode_state(self, state: Dict) -> None:
        with private_params():
            self.global_guide.load_state_dict(state["global_guide"])
        optim, scheduler = self._optimiser()
        optim.load_state_dict(copy.deepcopy(state["optim"]))
        scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))


__all__ = ["ClientFailureWarning", "ClosedFormServer", "GradientServer", "Server"]
