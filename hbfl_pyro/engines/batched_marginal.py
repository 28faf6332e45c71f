"""The vectorised engine of the second-order server: a round's clients in one pass.

The round's clients' data are collated into one batch and their Laplace marginals
(:class:`~hbfl_pyro.laplace_marginal.LaplaceMarginal`) evaluated together: the model still
runs on one client's data at a time, mapped over the clients by ``torch.func.vmap``, so
each client's reply is what it computes alone (up to float rounding; padded rows are
masked out by the model). Replies are per client and pass through the same delivery
point as the in-process engine's. If the batched pass raises, the round is run client by
client instead, so a failure is charged to the client that caused it.

This engine simulates many clients on one machine (their data meet in one process): for
simulation and benchmarks, never deployment.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..data import collate
from ..laplace_marginal import LaplaceMarginal, MarginalClient, pilot_noise, psis_noise
from .base import Failures
from .inprocess import InProcessEngine


class BatchedMarginalEngine(InProcessEngine):
    """Runs all of a round's second-order clients in one batched computation.

    :param clients: ``{name: MarginalClient}`` (their Newton starts are read and written).
    :param on_message: optional hook called with every message, both directions.
    """

    def __init__(self, clients: Dict[str, MarginalClient], on_message=None):
        super().__init__(clients, on_message)
        first = next(iter(clients.values()))
        self._names = list(clients)
        marginal = first.marginal
        self._batch = collate([c.data for c in clients.values()], per_client=first.per_client)
        self._marginal = LaplaceMarginal(
            marginal.model, marginal.structure, self._batch, marginal.layout, first.per_client
        )

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], Failures]:
        names = list(messages)
        for name in names:
            self.deliver("down", name, messages[name])
        try:
            replies = self._batched(names, messages)
        except Exception:  # charge a failure to its client: rerun one by one
            return super().run_round(messages)
        for name in names:
            self.deliver("up", name, replies[name])
        return replies, {}

    def _batched(self, names: List[str], messages: Dict[str, Dict]) -> Dict[str, Dict]:
        index = torch.tensor([self._names.index(n) for n in names])
        batch = {k: v[index] for k, v in self._batch.items()}
        marginal = self._marginal
        saved = marginal.batch
        marginal.batch = batch
        try:
            first = messages[names[0]]
            start = torch.cat([self.clients[n].start for n in names])
            replies = {}
            if first["task"] == "psis":
                clients = [self.clients[n] for n in names]
                centre, slope = _shared_centre(clients, marginal, start)
                noise = None
                if first.get("local_draws", 0):  # each client's own noise, from its seed
                    noise = torch.cat([psis_noise(messages[n], marginal.size) for n in names], 2)
                values = marginal.values(first["draws"], start, centre, slope, noise)
                for i, n in enumerate(names):
                    replies[n] = _reply(
                        self.clients[n], messages[n], log_lik=values[:, i], elbo=0.0
                    )
                return replies
            z = first["globals"]
            modes = marginal.modes(z, start)
            value, gradient, curvature = marginal.derivatives(z, modes)
            spread = None
            if first.get("local_draws", 0):  # the local-weight pilot, each client's noise
                noise = torch.cat([pilot_noise(messages[n], marginal.size) for n in names], 2)
                spread = marginal.weight_spread(z, modes, noise)
            for i, n in enumerate(names):
                if bool(torch.isfinite(modes[i]).all()):
                    client = self.clients[n]
                    client.start, client.centre, client.slope = modes[i : i + 1].clone(), z, None
                replies[n] = _reply(
                    self.clients[n],
                    messages[n],
                    value=value[i],
                    grad=gradient[i],
                    hess=curvature[i],
                    elbo=float(value[i]),
                )
                if spread is not None:
                    replies[n]["local_noise"] = spread[i]
            return replies
        finally:
            marginal.batch = saved


def batched_local_draws(
    engine, z: torch.Tensor, seed: int, local_draws: int = 1
) -> Dict[str, torch.Tensor]:
    """Every client's local draws at each row of ``z`` in one batched pass (one generator
    for the batch: equal in distribution to the per-client draws, not draw for draw)."""
    clients = list(engine.clients.values())
    start = torch.cat([c.start for c in clients])
    gen = torch.Generator().manual_seed(seed)
    centre, slope = _shared_centre(clients, engine._marginal, start)
    return engine._marginal.sample_locals(z, start, gen, centre, slope, local_draws)


def _shared_centre(clients, marginal: LaplaceMarginal, start: torch.Tensor):
    """The globals at which every client's Newton start is its mode, and the modes'
    derivative there, when all clients share them (else ``(None, None)``)."""
    centre = clients[0].centre
    if centre is None or any(
        c.centre is None or not torch.equal(c.centre, centre) for c in clients
    ):
        return None, None
    return centre, marginal.mode_slope(centre, start)


def _reply(client: MarginalClient, message: Dict, **content) -> Dict:
    return {
        "client": client.name,
        "round": message["round"],
        "num_examples": client.num_examples,
        **content,
    }
