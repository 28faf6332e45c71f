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
point, and the default in closed-form mode).
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
from .seeding import derive_seed, seeded
from .servers.base import ServerStrategy
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


class Server(ServerStrategy):
    """The first-order server side of federated SVI; ``Server(...)`` builds a
    :class:`ClosedFormServer` when given a ``family``, else a :class:`GradientServer`.
    Both share client selection, reply checks, participation (``scaled``/``stale``), the
    differential-privacy noise on the round's sum and the state's common part; each
    defines what it sends (:meth:`_message_params`), what a good reply holds
    (:meth:`_expected_reply`) and its update from the pooled replies (:meth:`_update`).

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
    :param dp: a :class:`~hbfl_pyro.dp.DPConfig`: every reply is clipped again, Gaussian
        noise is added to the round's sum before the update, and the round's record holds
        the run's ``epsilon`` and ``delta`` so far (its ``elbo`` is NaN: clients send none).
    """

    #: A short name recorded in the report and checkpoints (set by the subclasses).
    mode = "first_order"

    def __new__(cls, *args, **kwargs):
        if cls is Server:  # the mode follows from the arguments, as it always did
            family = (
                kwargs["family"] if "family" in kwargs else (args[5] if len(args) > 5 else None)
            )
            cls = ClosedFormServer if family is not None else GradientServer
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
        dp=None,
    ):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if participation not in ("scaled", "stale"):
            raise ValueError(f"participation must be 'scaled' or 'stale', got {participation!r}")
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
        self.dp = dp
        self.dp_releases = 0  # rounds that released a noisy sum (what the accountant counts)
        self.family_params: Optional[Dict[str, torch.Tensor]] = None
        self.optim: Optional[torch.optim.Adam] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.ExponentialLR] = None

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
        self._round_state = None  # q(phi) changes below
        good, bad = {}, list(failed)
        expected, key = self._expected_reply()
        for name, reply in replies.items():
            problem = _problem(reply, expected, key) or self._dp_problem(reply, key)
            if problem is None:
                good[name] = reply
            else:
                bad.append(name)
                warnings.warn(
                    f"round {server_round}: client {name!r} sent an unusable reply ({problem}); "
                    "it is left out of this round",
                    ClientFailureWarning,
                    stacklevel=2,
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
                stacklevel=2,
            )
            record["elbo"] = float("nan")
            if self.dp is not None:
                record["epsilon"] = self.dp.epsilon(self.dp_releases)
                record["delta"] = self.dp.delta
            return record
        if self.participation == "stale":
            self.stale.update(good)
            pool, scale = self.stale, self.num_clients / len(self.stale)
        else:
            pool, scale = good, self.num_clients / len(good)
        client_elbo = scale * sum(r["elbo"] for r in pool.values())
        noisy = None
        if self.dp is not None:
            # Noise on the unscaled sum; scaling and the update are post-processing.
            self.dp.check_round(self.dp_releases + 1)  # also where no FederatedSVI drives
            seed = self.dp.noise_seed(self.seed, server_round)
            noisy = self.dp.noisy_sum([r[key] for r in pool.values()], seed)
            self.dp_releases += 1
        own = self._update(server_round, pool, scale, noisy)
        record["updated"] = True
        record["elbo"] = own + client_elbo
        if self.dp is not None:
            record["elbo"] = float("nan")  # clients send no ELBO under DP
            record["epsilon"] = self.dp.epsilon(self.dp_releases)
            record["delta"] = self.dp.delta
        return record

    def _update(self, server_round: int, pool: Dict[str, Dict], scale: float, noisy) -> float:
        """Update ``q(phi)`` from the pooled replies (times ``scale``; ``noisy``: their
        noised sum under DP); returns the server's own ELBO term."""
        raise NotImplementedError

    def halve_step(self) -> bool:
        """Halve the server's step size (the stopping rule's answer to a plateau:
        :mod:`hbfl_pyro.convergence`); ``False`` where there is none (closed form)."""
        return False

    def _expected_reply(self) -> Tuple[Dict[str, torch.Size], str]:
        """The names and shapes a good reply carries, and under which key."""
        raise NotImplementedError

    def _dp_problem(self, reply: Dict, key: str) -> Optional[str]:
        """Under DP, the public ``count`` of a closed-form reply must be exactly 1 (it is
        neither clipped nor noised); checked here so that such a reply is left out with a
        warning naming the client, before it could enter the stale pool."""
        if self.dp is None or key != "stats" or "count" not in reply[key]:
            return None
        if not bool((reply[key]["count"] == 1).all()):
            return "its public 'count' is not 1, which differential privacy requires"
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """A snapshot of the server's state (copies: later rounds do not change it)."""
        state: Dict[str, Any] = {"mode": self.mode, "stale": copy.deepcopy(self.stale)}
        if self.dp is not None:
            state["dp_releases"] = self.dp_releases
            state["dp_accounting"] = (float(self.dp.noise_multiplier), self.dp.accountant)
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
        if self.dp is not None and "dp_releases" not in state:
            raise ValueError(
                "the checkpoint is of a run without differential privacy: its rounds were "
                "released without noise, so no epsilon holds for a continuation; start afresh"
            )
        if self.dp is not None and "dp_accounting" in state:
            z, accountant = state["dp_accounting"]
            if (z, accountant) != (float(self.dp.noise_multiplier), self.dp.accountant):
                raise ValueError(
                    f"the checkpoint's rounds ran with noise multiplier {z:g} ({accountant} "
                    f"accountant); this run's DPConfig has {self.dp.noise_multiplier:g} "
                    f"({self.dp.accountant}): epsilon would be misreported. Resume with the "
                    "same DPConfig, or start a new run"
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
        self.dp_releases = state.get("dp_releases", 0)
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

    def _update(self, server_round: int, pool: Dict[str, Dict], scale: float, noisy) -> float:
        keys = next(iter(pool.values()))["stats"].keys()
        if noisy is not None:
            sums = {k: scale * noisy[k] for k in keys}
        else:
            sums = {k: scale * sum(r["stats"][k] for r in pool.values()) for k in keys}
        family = self._family()
        self.family_params = family.server_update(sums, self.num_clients)
        return float(family.neg_kl(self.family_params))

    def sum_layout(self, server_round: int) -> Dict[str, Tuple[int, ...]]:
        """Closed form: the clients' summaries (``stats/<key>``) are all the update needs
        of them (see :meth:`~hbfl_pyro.servers.base.ServerStrategy.sum_layout`); refused in
        differential privacy and with stale participation of a sampled fraction."""
        if self.dp is not None:
            raise NotImplementedError(
                "secure aggregation with differential privacy (dp=) is not supported yet: "
                "the server would have to add its noise to the secure sum; turn one off"
            )
        if self.participation == "stale" and self.fraction < 1:
            raise NotImplementedError(
                "participation='stale' keeps each client's latest reply, which secure "
                "aggregation never shows the server; use participation='scaled' or fraction=1"
            )
        shapes, _ = self._expected_reply()
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
        scale = self.num_clients / len(clients)
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

    def _expected_reply(self):
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

    def _update(self, server_round: int, pool: Dict[str, Dict], scale: float, noisy) -> float:
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
            if noisy is not None:
                total = noisy[name]
            else:
                total = sum(r["grads"][name] for r in pool.values())
            param.grad = param.grad + scale * total if param.grad is not None else scale * total
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

    def _expected_reply(self):
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
