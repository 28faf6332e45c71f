"""FederatedSVI: fit one Pyro hierarchy across clients, round by round.

Each round (method.md §3) the server samples clients, sends each what its objective needs
of ``q(phi)``, each sampled client runs local SVI steps on its own block of the ELBO and
replies, and the server updates ``q(phi)``. Every message passes through the engine's
single delivery point. All state is explicit and serialisable (plain dicts of tensors):
:meth:`FederatedSVI.checkpoint` then :meth:`FederatedSVI.resume` continues exactly as an
uninterrupted run, because every random choice is seeded by ``(seed, round, client)``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Dict, List, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from .client import Client, LocalConfig
from .data import FederatedData
from .dp import DPConfig
from .elbo import server_term, with_particles
from .engines import ENGINES
from .families.base import ClosedFormFamily
from .families.normal import NormalNormal
from .guides import build_global_guide, private_params
from .seeding import derive_seed, seeded
from .server import Server
from .structure import ModelStructure, ModelStructureError, discover_structure


def _choose_family(
    server, model, structure: ModelStructure, data, global_guide
) -> Optional[ClosedFormFamily]:
    custom_guide = not (isinstance(global_guide, str) and global_guide == "auto")
    if custom_guide and (server == "closed_form" or isinstance(server, ClosedFormFamily)):
        raise ValueError(
            "a closed-form server owns q(phi) itself and takes no global_guide; drop "
            "global_guide, or use server='gradient' to fit q(phi) with that guide"
        )
    if isinstance(server, ClosedFormFamily):
        _check_family(server, structure)
        return server
    if server == "gradient" or (server == "auto" and custom_guide):
        return None  # a user-chosen global guide implies the gradient server
    if server not in ("auto", "closed_form"):
        raise ValueError(
            f"server must be 'auto', 'closed_form', 'gradient' or a family, got {server!r}"
        )
    family = None if structure.likelihood_globals else NormalNormal.detect(model, structure, data)
    if family is None and server == "closed_form":
        reason = (
            f"global site(s) {list(structure.likelihood_globals)} enter the likelihood"
            if structure.likelihood_globals
            else "no conjugate family matches the model's global and local sites"
        )
        raise ModelStructureError(
            f"server='closed_form' is not possible: {reason}. Use server='gradient' (any "
            "model) or pass a family instance (e.g. hbfl_pyro.NIWDiag) matching the model"
        )
    return family


def _check_family(family: ClosedFormFamily, structure: ModelStructure) -> None:
    if set(family.global_sites) != set(structure.global_sites):
        raise ModelStructureError(
            f"the family's global sites {list(family.global_sites)} differ from the model's "
            f"{list(structure.global_sites)}; a closed-form server must own every global site"
        )
    if family.local_site not in structure.local_sites:
        raise ModelStructureError(
            f"the family's local site {family.local_site!r} is not a local site of the model "
            f"(local sites: {list(structure.local_sites)})"
        )
    if structure.likelihood_globals:
        raise ModelStructureError(
            f"global site(s) {list(structure.likelihood_globals)} enter the likelihood, so the "
            "server block has no closed form; use server='gradient'"
        )


class FederatedSVI:
    """Federated stochastic variational inference for a hierarchical Pyro model.

    :param model: a Pyro model taking one collated data dict, with a clients plate
        (see :mod:`hbfl_pyro.data`). The same model runs under plain Pyro on pooled data.
    :param data: the clients' data: ``{name: {key: array}}``, a list, or
        :class:`~hbfl_pyro.data.FederatedData`.
    :param global_guide: ``"auto"`` (``AutoNormal``), an autoguide class, or a module.
    :param local_guide: ``"auto"`` (``AutoNormal``), an autoguide class, or a module.
    :param server: ``"auto"`` (closed form when a conjugate family is found, gradient
        otherwise), ``"closed_form"``, ``"gradient"``, or a family instance.
    :param fraction: fraction of clients sampled each round.
    :param participation: ``"scaled"`` (unbiased ``N/|S|`` scaling) or ``"stale"``
        (keep each client's latest reply); default stale in closed-form mode, scaled in
        gradient mode.
    :param min_clients: fewest good replies for a round to update the server.
    :param local_steps: local SVI steps per round; ``local_lr``: their Adam step size in
        a client's first round; ``local_lr_decay``: its decay per round the client takes part in.
    :param num_particles: particles of the local steps; ``grad_particles`` of the
        gradient sent up; ``server_particles`` of the server term.
    :param moment_matched: moment-matched guide noise in the clients' estimates
        (:mod:`hbfl_pyro.noise`).
    :param server_lr: Adam step size of the server (gradient mode); ``lr_decay`` its
        per-round multiplicative decay.
    :param seed: the run's seed; every random choice derives from it.
    :param plate: the clients plate's name.
    :param engine: ``"inprocess"`` (a loop over client objects, the default and the
        reference) or ``"vectorised"`` (a round's clients in one batched computation; for
        simulations with many clients).
    :param on_message: hook ``(direction, client, message)`` called on every message.
    :param dp: a :class:`~hbfl_pyro.dp.DPConfig` for client-level differential privacy:
        clients clip their replies and send no ELBO, the server adds Gaussian noise to each
        round's sum; :attr:`privacy` and each history record report ``epsilon, delta``.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(i + 0.5), "sigma": torch.tensor(1.0)}
        ...            for i in range(3)}
        >>> fit = FederatedSVI(model, clients, seed=0)
        >>> fit.server.mode
        'closed_form'
        >>> history = fit.run(5, progress=False)
    """

    def __init__(
        self,
        model: Callable,
        data: Union[FederatedData, Dict, List],
        *,
        global_guide="auto",
        local_guide="auto",
        server="auto",
        fraction: float = 1.0,
        participation: Optional[str] = None,
        min_clients: int = 1,
        local_steps: int = 10,
        local_lr: float = 0.05,
        local_lr_decay: float = 1.0,
        num_particles: int = 1,
        grad_particles: int = 8,
        server_lr: float = 0.05,
        lr_decay: float = 1.0,
        server_particles: int = 8,
        moment_matched: bool = False,
        seed: int = 0,
        plate: str = "clients",
        per_client=(),
        engine: str = "inprocess",
        on_message=None,
        dp=None,
    ):
        self.model = model
        if dp is not None and not isinstance(dp, DPConfig):
            raise TypeError(
                f"dp must be a hbfl_pyro.dp.DPConfig (e.g. DPConfig(clip=1.0, "
                f"noise_multiplier=1.0)), got {type(dp).__name__}"
            )
        self.dp = dp
        if isinstance(data, FederatedData) and per_client and tuple(per_client) != data.per_client:
            raise ValueError(
                "per_client was given but data is already a FederatedData with per_client="
                f"{data.per_client}; pass it when building the FederatedData"
            )
        self.data = data if isinstance(data, FederatedData) else FederatedData(data, per_client)
        self.seed = seed
        #: The guides as given (``"auto"``, a class, a partial or a module): what
        #: :func:`~hbfl_pyro.compare.compare_pooled` rebuilds its pooled guide from.
        self.guide_specs = {"global": global_guide, "local": local_guide}
        # Guide initialisation may sample (e.g. init_to_median): seed it like everything else.
        with private_params(), seeded(derive_seed(seed, "init")):
            self.structure = discover_structure(model, self.data, plate)
            self.family = _choose_family(server, model, self.structure, self.data, global_guide)
            placeholder = self.data.placeholder()
            global_template = None
            if self.family is None:
                global_template = build_global_guide(
                    model, self.structure, placeholder, global_guide
                )
            config = LocalConfig(
                local_steps, local_lr, local_lr_decay, num_particles, grad_particles, moment_matched
            )
            self.clients = {}
            for i, name in enumerate(self.data.names):
                # Each client's initialisation has its own seed, so it does not depend on
                # the other clients: a Flower node, which builds its client alone, starts
                # exactly where the in-process client starts.
                with seeded(derive_seed(seed, "init", name)):
                    self.clients[name] = Client(
                        name,
                        self.data[i],
                        model,
                        self.structure,
                        global_template,
                        local_guide,
                        self.family,
                        config,
                        self.data.per_client,
                        dp=dp,
                    )
        if participation is None:
            participation = "stale" if self.family is not None else "scaled"
        self.server = Server(
            self.data.names,
            model,
            self.structure,
            placeholder,
            global_template,
            self.family,
            fraction=fraction,
            min_clients=min_clients,
            participation=participation,
            lr=server_lr,
            lr_decay=lr_decay,
            num_particles=server_particles,
            seed=seed,
            dp=dp,
        )
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
        self.engine = ENGINES[engine](self.clients, on_message)
        self.round = 0
        self.history: List[Dict] = []

    # ------------------------------------------------------------------ rounds
    def step(self) -> Dict:
        """Run one round; returns its record (ELBO estimate, participants, seconds)."""
        server_round = self.round + 1
        if self.dp is not None:
            self.dp.check_round(server_round)
        start = time.perf_counter()
        chosen = self.server.select(server_round)
        messages = {name: self.server.message(server_round, name) for name in chosen}
        replies, failed = self.engine.run_round(messages)
        record = self.server.aggregate(server_round, replies, failed)
        record["seconds"] = time.perf_counter() - start
        self.round = server_round
        self.history.append(record)
        return record

    def run(self, rounds: int, progress: bool = True) -> List[Dict]:
        """Run ``rounds`` rounds with a progress bar; returns the whole history."""
        bar = tqdm(range(rounds), disable=not progress, desc="federated SVI", unit="round")
        for _ in bar:
            record = self.step()
            bar.set_postfix(elbo=f"{record['elbo']:.3f}", clients=len(record["clients"]))
        return self.history

    @property
    def privacy(self) -> Optional[Dict]:
        """``None`` without DP; else the run's ``epsilon``, ``delta`` and settings so far
        (:meth:`hbfl_pyro.dp.DPConfig.report`). Covers what the server releases (``q(phi)``,
        the history); :meth:`elbo` and the clients' local factors read the clients directly
        and are not covered."""
        return None if self.dp is None else self.dp.report(self.server.dp_releases)

    # ------------------------------------------------------------------ evaluation
    def elbo(self, num_particles: int = 256) -> float:
        """An estimate of the full ELBO at the current state (all clients)."""
        seed_round = -1 - self.round
        total = 0.0
        for name, client in self.clients.items():
            total += client.elbo(self.server.message(seed_round, name), num_particles)
        if self.family is not None:
            return total + float(self.family.neg_kl(self.server.family_params))
        with private_params(), torch.no_grad():
            own = server_term(
                self.model,
                self.server.global_guide,
                self.server.placeholder,
                self.structure,
                num_particles,
            )
        return total + float(own)

    def global_samples(self, num_samples: int = 1000) -> Dict[str, torch.Tensor]:
        """Draws of each global site from ``q(phi)``: ``{site: (num_samples, *shape)}``."""
        if self.family is not None:
            return self.family.sample_posterior(self.server.family_params, num_samples)
        return _draw(
            self.server.global_guide, self.server.placeholder, self.structure, num_samples, None
        )

    def local_samples(
        self, num_samples: int = 1000, global_draws: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        """Draws of each local site: ``{site: (num_samples, num_clients, *shape)}``.

        :param global_draws: draws of the global sites (as :meth:`global_samples` returns
            them) to pair with: a structured local factor ``q_i(theta_i | phi)`` draws
            conditionally on them, so the joint draws are consistent. Drawn afresh if
            omitted; mean-field local factors ignore them.
        """
        conditional = getattr(next(iter(self.clients.values())).local_guide, "needs_globals", False)
        values = None
        if conditional:
            draws = self.global_samples(num_samples) if global_draws is None else global_draws
            values = {n: _particle_shaped(draws[n], n, self.structure) for n in draws}
        per_client = []
        for c in self.clients.values():
            guide = partial(c.local_guide, globals=values) if conditional else c.local_guide
            per_client.append(
                _draw(guide, c._batch, self.structure, num_samples, self.structure.plate)
            )
        return {
            s: torch.stack([d[s] for d in per_client], dim=1) for s in self.structure.local_sites
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """Everything needed to continue: round, server, every client's local factor."""
        return {
            "round": self.round,
            "seed": self.seed,
            "server": self.server.state_dict(),
            "clients": {name: c.state_dict() for name, c in self.clients.items()},
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: Dict) -> None:
        # Every check comes before any assignment: a refused checkpoint changes nothing.
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from this run's {self.seed}")
        if sorted(state["clients"]) != sorted(self.clients):
            raise ValueError("the checkpoint's clients differ from this run's clients")
        self.server.check_state(state["server"])
        self.round = state["round"]
        self.server.load_state_dict(state["server"])
        for name, client_state in state["clients"].items():
            self.clients[name].load_state_dict(client_state)
        self.history = [dict(r) for r in state["history"]]

    def checkpoint(self, path) -> None:
        """Write the state to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), path)

    def resume(self, path) -> None:
        """Load a state written by :meth:`checkpoint`; the next round continues it."""
        self.load_state_dict(torch.load(path, weights_only=False))


def _particle_shaped(draws: torch.Tensor, site: str, structure: ModelStructure) -> torch.Tensor:
    """Global draws ``(n, *shape)`` laid out as under the particle plate (left of all plates)."""
    event_dim = structure.event_dim(site)
    shape = draws.shape[1:]
    batch_dims = len(shape) - event_dim
    pad = structure.max_plate_nesting - batch_dims
    return draws.reshape(draws.shape[:1] + (1,) * pad + shape)


def _draw(guide, batch, structure: ModelStructure, num_samples: int, plate: Optional[str]):
    """``num_samples`` vectorised draws of a guide's sites, without singleton plate dims.

    With ``plate`` given (a local guide of one client), the clients-plate axis is dropped.
    """
    drawn = with_particles(guide, num_samples, structure.max_plate_nesting)
    with private_params(), torch.no_grad(), pyro.validation_enabled(False):
        # One plain draw gives each site's shape (a conditional factor without its globals).
        single = poutine.trace(getattr(guide, "func", guide)).get_trace(batch)
        trace = poutine.trace(drawn).get_trace(batch) if num_samples > 1 else single
    out = {}
    for name, site in single.nodes.items():
        if (
            site["type"] != "sample"
            or site["is_observed"]
            or site_is_subsample(site)
            or site["infer"].get("is_auxiliary")
        ):
            continue
        shape = site["value"].shape
        if plate is not None:
            axis = site["value"].dim() - site["fn"].event_dim + structure.plate_dim
            shape = shape[:axis] + shape[axis + 1 :]
        out[name] = trace.nodes[name]["value"].reshape((num_samples,) + tuple(shape))
    return out
