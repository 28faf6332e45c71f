"""The vectorised simulation engine: a round's clients as one batched computation.

The sampled clients' data are collated into one batch, their local parameters stacked
along the clients axis into one local guide, and their local steps run together: the
objective is the *sum* of the clients' terms, so each client's parameters receive exactly
the gradient of its own term. Adam is applied row by row with each client's own step
count and learning rate, so a client's update is the one the per-client loop
(:class:`~hbfl_pyro.engines.InProcessEngine`) computes — identical whenever the objective
is deterministic (tested), equal in distribution otherwise (the batch shares one draw of
``phi`` per step instead of one per client). Replies are per client: the per-client
gradients come from one backward pass through per-client copies of the global parameters
(global sites whose own plates lie right of the clients plate), else from one batched
vector-Jacobian product.

The clients' state stays where the loop keeps it (each client's guide parameters and its
``torch.optim.Adam`` state), so ``state_dict``/checkpoints are engine-independent. A round
gathers it into stacked tensors once and scatters it back once, with one ``torch.cat`` /
``torch._foreach_copy_`` per parameter: the per-client Python work left is a few
dictionary look-ups and the per-client reply dicts the protocol needs, so the round time
grows with the batched arithmetic rather than with a Python loop over clients.

This engine simulates many clients on one machine; the clients' data meet in one process,
so it is for simulation and benchmarks, never deployment.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import pyro
import torch
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoNormal
from torch.func import functional_call

from ..client import Client, local_objective, recentre_local_guide
from ..data import collate
from ..guides import build_local_guide, local_moments, private_params
from ..guides.base import is_conditional
from ..seeding import derive_seed, seeded
from ..server import ClientFailureWarning
from .base import Failures
from .inprocess import InProcessEngine


class VectorisedEngine(InProcessEngine):
    """Runs all of a round's clients in one batched computation.

    A round gathers the sampled clients' local parameters and Adam moments into stacked
    tensors once (one ``torch.cat`` per parameter), runs every local step on the stacks,
    and scatters the results back once (one ``torch._foreach_copy_`` per parameter), so
    the per-client Python work of a round is a few dictionary look-ups: each client's
    ``state_dict`` (and so checkpointing) is exactly what the per-client loop leaves.

    :param clients: ``{name: Client}`` (their states are read and written back each round).
    :param on_message: optional hook called with every message, both directions.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(4)}
        >>> fit = FederatedSVI(model, clients, engine="vectorised", local_steps=2, seed=0)
        >>> type(fit.engine).__name__
        'VectorisedEngine'
        >>> fit.step()["clients"]
        ['site0', 'site1', 'site2', 'site3']
    """

    def __init__(self, clients: Dict[str, Client], on_message=None):
        super().__init__(clients, on_message)
        first = next(iter(clients.values()))
        self._template = first.local_guide
        if not isinstance(self._template, AutoGuide) and not is_conditional(self._template):
            # The batched guide is rebuilt from the template's class for the whole round's
            # clients: possible for autoguides and classes with ``for_client`` only.
            raise NotImplementedError(
                "the vectorised engine supports autoguides and guide classes with a "
                f"for_client constructor (e.g. StructuredLocalNormal) as local guides, not "
                f"{type(self._template).__name__}; use engine='inprocess' for this guide"
            )
        self._names = [n for n, _ in first.local_guide.named_parameters()]
        for name, param in first.local_guide.named_parameters():
            if param.shape[:1] != (1,):
                raise NotImplementedError(
                    f"the vectorised engine stacks local parameters along their first axis; "
                    f"{name!r} has shape {tuple(param.shape)} (use the in-process engine)"
                )
        for name, client in clients.items():
            # Rounds read a client's parameters from its optimiser's list (no module walk
            # per client); that list must be its guide's parameters, in the same order.
            own = _own_params(client)
            guide_params = [p for _, p in client.local_guide.named_parameters()]
            if len(own) != len(guide_params) or any(a is not b for a, b in zip(own, guide_params)):
                raise NotImplementedError(
                    f"client {name!r}: its optimiser does not hold exactly its local guide's "
                    "parameters in order; the vectorised engine cannot stack them (use the "
                    "in-process engine)"
                )
        self._guides: Dict[int, object] = {}
        self._batch_key: Tuple[str, ...] = ()
        self._batch: Optional[Dict[str, torch.Tensor]] = None

    def _batched_guide(self, names: List[str], batch):
        size = len(names)
        if size not in self._guides:
            first = self.clients[names[0]]
            with private_params():
                self._guides[size] = build_local_guide(
                    first.model, first.structure, batch, type(self._template)
                )
        return self._guides[size]

    def _collated(self, names: List[str], clients: List[Client]):
        # Under full participation every round has the same clients: collate them once
        # (clients' data never change during a fit).
        key = tuple(names)
        if key != self._batch_key:
            self._batch = collate([c.data for c in clients], per_client=clients[0].per_client)
            self._batch_key = key
        return self._batch

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], Failures]:
        """Deliver the messages, run every sampled client's local steps in one batch, reply."""
        names = list(messages)
        for name in names:
            self.deliver("down", name, messages[name])
        clients = [self.clients[n] for n in names]
        own = [_own_params(c) for c in clients]
        first = clients[0]
        batch = self._collated(names, clients)
        guide = self._batched_guide(names, batch)
        message = messages[names[0]]
        config, structure, family = first.config, first.structure, first.family
        with private_params(), seeded(derive_seed(message["seed"], "vectorised")):
            params = dict(guide.named_parameters())
            stacked = [params[k] for k in self._names]
            global_guide = first.global_guide
            together = is_conditional(guide) and guide.batched_recentre
            if family is None:
                global_guide.load_state_dict(message["global_params"])
            if family is None and not together:
                for name, client in zip(names, clients):  # as Client.update does, first
                    recentre_local_guide(
                        client.local_guide, global_guide, structure, client.batch, messages[name]
                    )
            with torch.no_grad():
                for j, param in enumerate(stacked):
                    param.copy_(torch.cat([p[j] for p in own]))
                for key, buffer in guide.named_buffers():  # e.g. a structured factor's centres
                    buffer.copy_(torch.cat([c.local_guide.get_buffer(key) for c in clients]))
            if family is None and together:
                # One recentring for the round's clients (e.g. LaplaceLocalNormal's Newton
                # start), written back to each client's own guide.
                recentre_local_guide(guide, global_guide, structure, batch, message)
                with torch.no_grad():
                    for key, buffer in guide.named_buffers():
                        for client, row in zip(clients, buffer.split(1)):
                            client.local_guide.get_buffer(key).copy_(row)
            # A parameter-free local guide (LaplaceLocalNormal) takes no local steps.
            adam = _RowAdam(clients, own, stacked) if stacked else None
            if adam is not None:
                for _ in range(config.steps):
                    terms = local_objective(
                        first.model,
                        structure,
                        family,
                        message,
                        global_guide,
                        guide,
                        batch,
                        len(names),
                        config.num_particles,
                        config.moment_matched,
                    )
                    adam.step(torch.autograd.grad(-terms.sum(), stacked))
                adam.write_back()
            with torch.no_grad():
                for j, param in enumerate(stacked):
                    torch._foreach_copy_([p[j] for p in own], param.split(1))
            for client in clients:
                client.updates += 1
            replies = self._replies(names, clients, message, guide, batch, global_guide)
        for client, name in zip(clients, names):
            if client.dp is not None:  # as Client.update does: clip on the client, no ELBO
                key = "stats" if client.family is not None else "grads"
                reply = replies[name]
                reply[key] = client.dp.clip_message(reply[key], f"client {name!r}")
                reply["elbo"] = 0.0
        for name in names:
            self.deliver("up", name, replies[name])
        return replies, {}

    @staticmethod
    def _per_client_copies(global_guide, size: int, structure):
        """Per-client copies of an autoguide's global parameters, or ``None`` if unsupported.

        Supported when every global site's batch dimensions (its own plates, e.g. an items
        plate) lie to the right of the clients plate, so a leading clients axis can sit
        where the clients plate does: a parameter of shape ``batch + event`` becomes
        ``(clients, 1, ..., 1) + batch + event``.
        """
        if not isinstance(global_guide, (AutoNormal, AutoDelta)):
            return None
        prototype = global_guide.prototype_trace
        pad = {}
        for name in structure.global_sites:
            batch = len(prototype.nodes[name]["fn"].batch_shape)
            if batch >= -structure.plate_dim:
                return None
            pad[name] = (size,) + (1,) * (-structure.plate_dim - 1 - batch)
        # Parameter names: AutoNormal's locs.<site> and scales.<site>, AutoDelta's <site>,
        # with PyroModule's "_unconstrained" suffix on constrained ones.
        site_of = {
            f"{prefix}{name}{suffix}": name
            for name in pad
            for prefix in ("", "locs.", "scales.")
            for suffix in ("", "_unconstrained")
        }
        copies = {}
        for key, param in global_guide.named_parameters():
            site = site_of.get(key)
            if site is None:
                return None
            copies[key] = param.detach().expand(pad[site] + param.shape).clone().requires_grad_()
        return copies

    def _replies(self, names, clients, message, guide, batch, global_guide) -> Dict[str, Dict]:
        first = clients[0]
        config, structure, family = first.config, first.structure, first.family
        size = len(names)
        replies = {
            n: {"client": n, "round": message["round"], "num_examples": c.num_examples}
            for n, c in zip(names, clients)
        }

        def terms_with(global_factor):
            return local_objective(
                first.model, structure, family, message, global_factor, guide, batch,
                size, config.grad_particles, config.moment_matched,
            )  # fmt: skip

        if family is not None:
            values = terms_with(None).detach().tolist()
            # The stacked guide holds every client's q_i in its rows: one call gives all
            # clients' moments, row i being what local_moments gives on client i's guide.
            mean, var = local_moments(guide, family.local_site)
            mean, var = mean.detach().reshape(size, -1), var.detach().reshape(size, -1)
            for i, name in enumerate(names):
                stats = family.client_summary(mean[i], var[i])
                replies[name]["stats"] = {k: v.detach().clone() for k, v in stats.items()}
                replies[name]["elbo"] = values[i]
            return replies
        keys, tensors = zip(*global_guide.named_parameters())
        copies = self._per_client_copies(global_guide, size, structure)
        if copies is not None:
            # Each client draws phi from its own copy of the global parameters (the draws
            # sit in the clients plate), so one backward pass of the summed terms leaves
            # client i's gradient in row i of the copies: O(1) passes, not O(clients).
            def per_client_guide(data):
                with pyro.plate(structure.plate, size, dim=structure.plate_dim):
                    return functional_call(global_guide, copies, (data,))

            terms = terms_with(per_client_guide)
            jac = torch.autograd.grad(-terms.sum(), [copies[k] for k in keys], allow_unused=True)
        else:
            # Other guides: one batched vector-Jacobian product over the shared draw.
            terms = terms_with(global_guide)
            eye = -torch.eye(size, dtype=terms.dtype)
            jac = torch.autograd.grad(
                terms, tensors, grad_outputs=eye, is_grads_batched=True, allow_unused=True
            )
        # Row i of each gradient is client i's; one unbind per parameter, then each client
        # gets its own copies (its reply shares no storage with another client's).
        rows = [
            [r.clone() for r in j.detach().reshape((size,) + t.shape).unbind(0)]
            if j is not None
            else [torch.zeros_like(t) for _ in range(size)]
            for t, j in zip(tensors, jac)
        ]
        values = terms.detach().tolist()
        for i, name in enumerate(names):
            replies[name]["grads"] = {k: r[i] for k, r in zip(keys, rows)}
            replies[name]["elbo"] = values[i] if math.isfinite(values[i]) else float("nan")
        return replies


def _own_params(client: Client) -> List[torch.Tensor]:
    """A client's local parameters, as its optimiser lists them (none without one)."""
    return client.optim.param_groups[0]["params"] if client.optim is not None else []


def _adam(client: Client) -> torch.optim.Adam:
    """The client's Adam (a client whose local factor has parameters has one)."""
    if client.optim is None:
        raise RuntimeError(f"client {client.name!r} has no optimiser: no local parameters")
    return client.optim


class _RowAdam:
    """``torch.optim.Adam`` (default hyper-parameters) applied client by client on stacked rows.

    Each client keeps its own step count, learning rate and moment estimates, read from and
    written back to its own ``torch.optim.Adam`` (gathered into stacks once per round and
    copied back once); the arithmetic is torch's own Adam update.

    :param clients: the round's clients.
    :param own: each client's parameter tensors (its optimiser's list).
    :param params: the stacked parameters (row ``i`` is client ``i``), in the same order.
    """

    def __init__(self, clients: List[Client], own: List[List], params: List[torch.Tensor]):
        self.clients, self.own, self.params = clients, own, params
        group = _adam(clients[0]).param_groups[0]
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]
        if group["weight_decay"] or group["amsgrad"] or group.get("maximize"):
            warnings.warn(
                "the vectorised engine ignores Adam options other than betas and eps",
                ClientFailureWarning,
                stacklevel=2,
            )
        rates = [c.config.lr * c.config.lr_decay**c.updates for c in clients]
        for client, rate in zip(clients, rates):
            for group in _adam(client).param_groups:  # as the loop leaves it (checkpoints)
                group["lr"] = rate
        self.lr = torch.tensor(rates)
        # One look-up of each client's Adam state per parameter and round; ``None`` before
        # the client's first step. The same dicts are written back in place at the end.
        self.states = [
            [_adam(c).state.get(p[j]) for c, p in zip(clients, own)] for j in range(len(params))
        ]
        self.steps = torch.tensor([float(s["step"]) if s else 0.0 for s in self.states[0]])
        self.m = [self._gather(states, p, "exp_avg") for states, p in zip(self.states, params)]
        self.v = [self._gather(states, p, "exp_avg_sq") for states, p in zip(self.states, params)]

    @staticmethod
    def _gather(states: List, param: torch.Tensor, key: str) -> torch.Tensor:
        """Row ``i``: client ``i``'s moment ``key`` (zeros before its first step)."""
        if all(states):
            return torch.cat([s[key] for s in states])
        out = torch.zeros_like(param, requires_grad=False)
        have = [i for i, s in enumerate(states) if s]
        if have:
            out[have] = torch.cat([states[i][key] for i in have])
        return out

    def step(self, grads) -> None:
        """One Adam step of every row, with each client's own step count and rate."""
        self.steps = self.steps + 1
        bias1 = 1 - self.beta1**self.steps
        bias2 = 1 - self.beta2**self.steps
        with torch.no_grad():
            for g, p, m, v in zip(grads, self.params, self.m, self.v):
                shape = (-1,) + (1,) * (p.dim() - 1)
                m.lerp_(g, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v.sqrt() / bias2.sqrt().reshape(shape)).add_(self.eps)
                p.addcdiv_(m, denom * (bias1 / self.lr).reshape(shape), value=-1)

    def write_back(self) -> None:
        """Each client's Adam state becomes its row: copied into its state tensors in place."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        steps = self.steps.unbind()
        for j, states in enumerate(self.states):
            m_rows, v_rows = self.m[j].split(1), self.v[j].split(1)
            dst, src = [], []
            for i, state in enumerate(states):
                if state and isinstance(state.get("step"), torch.Tensor):
                    dst += [state["step"], state["exp_avg"], state["exp_avg_sq"]]
                    src += [steps[i], m_rows[i], v_rows[i]]
                else:  # the client's first round: tensors of its own, as Adam creates them
                    _adam(self.clients[i]).state[self.own[i][j]] = {
                        "step": torch.tensor(float(steps[i]), dtype=scalar),
                        "exp_avg": m_rows[i].clone(),
                        "exp_avg_sq": v_rows[i].clone(),
                    }
            if dst:
                torch._foreach_copy_(dst, src)
