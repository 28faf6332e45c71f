"""Baselines: plain reference FedAvg / FedProx, their fast engine versions, local-only.

:func:`reference_fedavg` is written the way FedAvg (McMahan et al. 2017) and FedProx
(Li et al. 2020) are usually written, independently of the hierarchy's code: a copy of an
``nn.Module`` per client, ``torch.optim.SGD`` on its parameters, the mean cross-entropy
of each minibatch (plus ``mu/2 ||w - w_global||^2`` for FedProx), and a state-dict average
weighted by data size (``weighting="size"``, FedAvg's rule) or equal. It shares with the
hierarchy only the schedule — which clients take part in a round
(:func:`~hbfl_pyro.deep.local.select_clients`) and their minibatches
(:func:`~hbfl_pyro.deep.local.batch_schedule`) — which is what "same seeds, same client
order and batches" means in the special-case tests.

:class:`FedProx` is FedProx(mu) (``mu = 0``: FedAvg) as
:class:`~hbfl_pyro.deep.fedhb.FedHB` with :class:`~hbfl_pyro.deep.FedProxFamily`: the same
server strategy and local engine (``"inprocess"`` or ``"vectorised"``), only the family
differs, so round times and every other part of a run are comparable.

:class:`Pooled` is centralised training on all clients' training data together with the
budget of the federated runs (the upper reference of evaluation.md §B), and
:func:`local_only` the no-federation lower one. The personalised-FL baselines (Ditto,
Per-FedAvg, pFedBayes) are in :mod:`hbfl_pyro.deep.personalised`.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import derive_seed
from .fedhb import ClientLike, FederatedTrainer, FedHB, FedProxFamily
from .local import LocalSpec, Penalty, batch_schedule, schedules_for, select_clients
from .nets import FlatNet
from .personalised import Ditto, PerFedAvg, PFedBayes  # noqa: F401  (re-exported)

__all__ = ["FedProx", "Pooled", "local_only", "reference_fedavg"]


def reference_fedavg(
    net: nn.Module,
    clients: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
    *,
    fraction: float = 1.0,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    mu: Union[float, Sequence[float]] = 0.0,
    weighting: str = "size",
    seed: int = 0,
) -> nn.Module:
    """FedAvg (``mu = 0``) or FedProx(``mu``), plain and independent (see the module doc).

    :param net: the initial global model (not modified).
    :param clients: each client's ``(x_train, y_train)``.
    :param mu: FedProx's proximal coefficient: one number, or one per client.
    :param weighting: ``"size"`` (``n_k / n``, FedAvg) or ``"equal"`` (``1 / |S|``).
    :returns: the global model after ``rounds`` rounds.
    """
    global_model = copy.deepcopy(net)
    mus = [float(mu)] * len(clients) if isinstance(mu, (int, float)) else [float(m) for m in mu]
    for server_round in range(1, rounds + 1):
        chosen = select_clients(len(clients), fraction, seed, server_round)
        local_states, sizes = [], []
        for k in chosen:
            x, y = clients[k]
            model = copy.deepcopy(global_model)
            anchor = [p.detach().clone() for p in global_model.parameters()]
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            seed_k = derive_seed(seed, server_round, k)
            for idx in batch_schedule(len(y), batch_size, epochs, seed_k):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if mus[k]:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                    loss = loss + 0.5 * mus[k] * prox
                loss.backward()
                optimizer.step()
            local_states.append(model.state_dict())
            sizes.append(len(y))
        total = float(sum(sizes))
        if weighting == "size":
            weights = [n / total for n in sizes]
        else:
            weights = [1.0 / len(sizes)] * len(sizes)
        averaged = {
            key: sum(w * state[key] for w, state in zip(weights, local_states))
            for key in local_states[0]
        }
        global_model.load_state_dict(averaged)
    return global_model


class FedProx(FedHB):
    """FedProx(mu) as FedHB with :class:`~hbfl_pyro.deep.FedProxFamily`: each client
    minimises the mean minibatch cross-entropy plus ``mu/2 ||w - w_global||^2``; the
    server averages (by size or equally). ``mu = 0`` is FedAvg.

    Only the server family differs from :class:`~hbfl_pyro.deep.FedHB` (and the
    mixture): the strategy's selection, participation, messages, failure handling, state
    and checkpoints, and ``dp=``, are FedHB's.

    :param mu: FedProx's coefficient (per example, as in the FedProx paper).
    :param weighting: ``"size"`` (FedAvg's rule, the default) or ``"equal"``.
    :param kwargs: ``fraction``, ``local``, ``engine``, ``chunk_size``, ``seed``,
        ``min_clients``, ``max_failures``, and FedHB's ``participation``, ``start``,
        ``on_message``, ``dp``.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> clients = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
        >>> fit = FedProx(mlp((4, 5, 3)), clients, mu=0.1, local=LocalSpec(batch_size=8))
        >>> len(fit.run(2)), fit.global_weights().shape
        (2, torch.Size([43]))
    """

    # (FedHB's state; the fingerprint keeps FedProx's own settings, see fingerprint.)
    SETTINGS: Tuple[str, ...] = ("mu", "weighting")

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        *,
        mu: float = 0.0,
        weighting: str = "size",
        **kwargs,
    ):
        if weighting not in ("size", "equal"):
            raise ValueError(f"weighting must be 'size' or 'equal', got {weighting!r}")
        family = FedProxFamily(FlatNet(net).vector(), mu)
        super().__init__(net, clients, family, weighting=weighting, **kwargs)

    @property
    def mu(self) -> float:
        """FedProx's per-example coefficient (the family's)."""
        return cast(FedProxFamily, self.family).mu

    @property
    def weights(self) -> torch.Tensor:
        """The global weights (``m0``; the attribute FedProx's state was once kept in)."""
        return self.global_weights()

    def fingerprint(self) -> Dict:
        """:meth:`FedHB.fingerprint <hbfl_pyro.deep.FederatedTrainer.fingerprint>` with
        FedProx's settings, and FedHB's options where they differ from FedProx's defaults
        (so a checkpoint written before FedProx took them still resumes)."""
        out = super().fingerprint()
        for name, default in (("participation", "scaled"), ("start", "global")):
            if getattr(self, name) != default:
                out["settings"][name] = getattr(self, name)
        return out

    def load_state_dict(self, state: Dict) -> None:
        """Continue from a :meth:`state_dict`; a state of the former layout (the global
        weights under ``"weights"``, before FedProx was a FedHB family) is read too."""
        if "weights" in state and "server" not in state:
            state = dict(state)
            weights = state.pop("weights")
            state["server"] = {"mode": self.server.mode, "family_params": {"m0": weights}}
            state["server"]["stale"] = {}
            state["own"] = {}
        super().load_state_dict(state)


def local_only(
    trainer: FederatedTrainer,
    data: Sequence[ClientLike],
    epochs: int,
    spec: Optional[LocalSpec] = None,
) -> torch.Tensor:
    """Each client trains alone from the network's initial weights for ``epochs`` epochs
    (no federation, no penalty): the local-only baseline. Uses ``trainer``'s engine.

    :returns: ``(C, d)``.
    """
    spec = spec or trainer.local
    spec = LocalSpec(**{**spec.__dict__, "epochs": epochs})
    pairs = trainer.prepare(data)
    sizes = [len(y) for _, y in pairs]
    schedules = schedules_for(sizes, spec, trainer.seed, "local-only", range(len(pairs)))
    return trainer.train(trainer.init, pairs, schedules, None, spec)


class Pooled(FederatedTrainer):
    """Centralised training on the pooled training data of all clients, with the federated
    runs' budget: the upper reference of evaluation.md §B.

    Round ``t`` draws the same clients as every federated method
    (:func:`~hbfl_pyro.deep.local.select_clients`) only to set its budget: the examples
    those clients would process, ``epochs * sum_{k in S_t} n_k``. The pooled model takes
    minibatches (the local spec's size, optimiser and step size) from one stream of
    shuffled passes over the pooled data (pass ``e`` seeded by ``(seed, "pooled", e)``)
    until it has processed that many examples; a surplus of the last minibatch is carried
    to the next round. So after ``R`` rounds it has seen the same number of examples as
    FedAvg, in sequential rather than parallel steps. The loss is the mean minibatch
    cross-entropy (no penalty); :meth:`finetune` is FedAvg's (plain local training from
    the pooled model).

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> clients = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
        >>> fit = Pooled(mlp((4, 5, 3)), clients, fraction=2 / 3, local=LocalSpec(batch_size=8))
        >>> [r["examples"] for r in fit.run(2)]
        [32, 32]
    """

    STATE = {"weights": "weights", "queue": "_queue", "passes": "_pass", "owed": "_owed"}

    #: One pooled model, no per-client replies: no client can fail (see FederatedTrainer).
    PER_CLIENT = False

    def __init__(self, net: nn.Module, clients: Sequence[ClientLike], **kwargs):
        super().__init__(net, clients, **kwargs)
        self.pooled = (
            torch.cat([x for x, _ in self.data]),
            torch.cat([y for _, y in self.data]),
        )
        self.weights = self.init.clone()
        self._queue: List[torch.Tensor] = []
        self._pass, self._owed = 0, 0

    def penalty(self) -> Penalty:
        return None

    def global_weights(self) -> torch.Tensor:
        return self.weights

    def _next_batch(self) -> torch.Tensor:
        if not self._queue:
            seed = derive_seed(self.seed, "pooled", self._pass)
            self._queue = batch_schedule(len(self.pooled[1]), self.local.batch_size, 1, seed)
            self._pass += 1
        return self._queue.pop(0)

    def local_updates(self, server_round: int, chosen: List[int]) -> Tuple[torch.Tensor, int]:
        """The round's budget of pooled minibatches (see the class doc): the pooled model
        after them, and the number of examples they held."""
        self._owed += self.local.epochs * sum(self.sizes[i] for i in chosen)
        batches = []
        while self._owed > 0:
            batches.append(self._next_batch())
            self._owed -= len(batches[-1])
        weights = self.train(self.weights, [self.pooled], [batches], None)[0]
        return weights, sum(len(b) for b in batches)

    def aggregate(self, chosen: List[int], thetas: Tuple[torch.Tensor, int]) -> Dict:
        """The pooled model is the global model."""
        self.weights, examples = thetas
        return {"examples": examples}
