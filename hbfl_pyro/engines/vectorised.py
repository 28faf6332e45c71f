"""The vectorised simulation engine: a round's clients as one batched computation.

The sampled clients' data are collated into one batch, their local parameters stacked
along the clients axis into one local guide, and their local steps run together: the
objective is the *sum* of the clients' terms, so each client's parameters receive exactly
the gradient of its own term. Adam is applied row by row with each client's own step
count and learning rate, so a client's update is the one the per-client loop
(:class:`~hbfl_pyro.engines.InProcessEngine`) computes — identical whenever the objective
is deterministic (tested), equal in distribution otherwise (the batch shares one draw of
``phi`` per step instead of one per client). Replies are per client: the per-client
gradients come from one batched vector-Jacobian product.

This engine simulates many clients on one machine; the clients' data meet in one process,
so it is for simulation and benchmarks, never deployment.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import pyro
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch.func import functional_call

from ..client import Client, local_objective
from ..data import collate
from ..guides import build_local_guide, local_moments, private_params
from ..seeding import derive_seed, seeded
from ..server import ClientFailureWarning
from .inprocess import InProcessEngine


class VectorisedEngine(InProcessEngine):
    """Runs all of a round's clients in one batched computation.

    :param clients: ``{name: Client}`` (their states are read and written back each round).
    :param on_message: optional hook called with every message, both directions.
    """

    def __init__(self, clients: Dict[str, Client], on_message=None):
        super().__init__(clients, on_message)
        first = next(iter(clients.values()))
        self._template = first.local_guide
        self._names = [n for n, _ in first.local_guide.named_parameters()]
        for name, param in first.local_guide.named_parameters():
            if param.shape[:1] != (1,):
                raise NotImplementedError(
                    f"the vectorised engine stacks local parameters along their first axis; "
                    f"{name!r} has shape {tuple(param.shape)} (use the in-process engine)"
                )
        self._guides: Dict[int, object] = {}

    def _batched_guide(self, names: List[str], batch):
        size = len(names)
        if size not in self._guides:
            first = self.clients[names[0]]
            with private_params():
                self._guides[size] = build_local_guide(
                    first._model, first._structure, batch, type(self._template)
                )
        return self._guides[size]

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], List[str]]:
        names = list(messages)
        for name in names:
            self.deliver("down", name, messages[name])
        clients = [self.clients[n] for n in names]
        first = clients[0]
        batch = collate([c.data for c in clients], per_client=first.per_client)
        guide = self._batched_guide(names, batch)
        message = messages[names[0]]
        config, structure, family = first.config, first._structure, first._family
        with private_params(), seeded(derive_seed(message["seed"], "vectorised")):
            params = dict(guide.named_parameters())
            with torch.no_grad():
                for key in self._names:
                    params[key].copy_(
                        torch.cat([dict(c.local_guide.named_parameters())[key] for c in clients])
                    )
            adam = _RowAdam(clients, self._names, params)
            global_guide = first.global_guide
            if family is None:
                global_guide.load_state_dict(message["global_params"])
            for _ in range(config.steps):
                terms = local_objective(
                    first._model,
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
                grads = torch.autograd.grad(-terms.sum(), [params[k] for k in self._names])
                adam.step(dict(zip(self._names, grads)))
            adam.write_back()
            for i, client in enumerate(clients):
                with torch.no_grad():
                    for key, param in client.local_guide.named_parameters():
                        param.copy_(params[key][i : i + 1])
                client.updates += 1
            replies = self._replies(names, clients, message, guide, batch, global_guide)
        failed = []
        for name in names:
            self.deliver("up", name, replies[name])
        return replies, failed

    @staticmethod
    def _per_client_copies(global_guide, size: int, structure):
        """Per-client copies of an autoguide's global parameters, or ``None`` if unsupported.

        Supported when every global site has no batch dimensions of its own (its shape is
        its event shape), so a leading clients axis can sit where the clients plate does.
        """
        if not isinstance(global_guide, (AutoNormal, AutoDelta)):
            return None
        prototype = global_guide.prototype_trace
        for name in structure.global_sites:
            if prototype.nodes[name]["fn"].batch_shape != ():
                return None
        lead = (size,) + (1,) * (-structure.plate_dim - 1)
        return {
            k: p.detach().expand(lead + p.shape).clone().requires_grad_()
            for k, p in global_guide.named_parameters()
        }

    def _replies(self, names, clients, message, guide, batch, global_guide) -> Dict[str, Dict]:
        first = clients[0]
        config, structure, family = first.config, first._structure, first._family
        size = len(names)
        replies = {
            n: {"client": n, "round": message["round"], "num_examples": c.num_examples}
            for n, c in zip(names, clients)
        }

        def terms_with(global_factor):
            return local_objective(
                first._model, structure, family, message, global_factor, guide, batch,
                size, config.grad_particles, config.moment_matched,
            )  # fmt: skip

        if family is not None:
            terms = terms_with(None).detach()
            for i, (name, client) in enumerate(zip(names, clients)):
                mean, var = local_moments(client.local_guide, family.local_site)
                stats = family.client_summary(mean.detach(), var.detach())
                replies[name]["stats"] = {k: v.detach().clone() for k, v in stats.items()}
                replies[name]["elbo"] = float(terms[i])
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
            rows = torch.autograd.grad(-terms.sum(), [copies[k] for k in keys])
            jac = [r.reshape((size,) + t.shape) for r, t in zip(rows, tensors)]
        else:
            # Other guides: one batched vector-Jacobian product over the shared draw.
            terms = terms_with(global_guide)
            eye = -torch.eye(size, dtype=terms.dtype)
            jac = torch.autograd.grad(
                terms, tensors, grad_outputs=eye, is_grads_batched=True, allow_unused=True
            )
        for i, name in enumerate(names):
            replies[name]["grads"] = {
                k: (torch.zeros_like(p) if j is None else j[i].detach().clone())
                for k, p, j in zip(keys, tensors, jac)
            }
            value = float(terms[i].detach())
            replies[name]["elbo"] = value if math.isfinite(value) else float("nan")
        return replies


class _RowAdam:
    """``torch.optim.Adam`` (default hyper-parameters) applied client by client on stacked rows.

    Each client keeps its own step count, learning rate and moment estimates, read from and
    written back to its own ``torch.optim.Adam``; the arithmetic is torch's own Adam update.
    """

    def __init__(self, clients: List[Client], names: List[str], params: Dict[str, torch.Tensor]):
        self.clients, self.names, self.params = clients, names, params
        group = clients[0].optim.param_groups[0]
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]
        if group["weight_decay"] or group["amsgrad"] or group.get("maximize"):
            warnings.warn(
                "the vectorised engine ignores Adam options other than betas and eps",
                ClientFailureWarning,
                stacklevel=2,
            )
        self.lr = torch.tensor([c.config.lr * c.config.lr_decay**c.updates for c in clients])
        self.steps = torch.tensor([float(self._state(c, 0).get("step", 0.0)) for c in clients])
        self.m, self.v = {}, {}
        for j, key in enumerate(names):
            rows_m, rows_v = [], []
            for c in clients:
                state = self._state(c, j)
                p = dict(c.local_guide.named_parameters())[key]
                rows_m.append(state.get("exp_avg", torch.zeros_like(p)))
                rows_v.append(state.get("exp_avg_sq", torch.zeros_like(p)))
            self.m[key], self.v[key] = torch.cat(rows_m), torch.cat(rows_v)

    @staticmethod
    def _state(client: Client, index: int) -> Dict:
        param = client.optim.param_groups[0]["params"][index]
        return client.optim.state.get(param, {})

    def step(self, grads: Dict[str, torch.Tensor]) -> None:
        self.steps = self.steps + 1
        bias1 = 1 - self.beta1**self.steps
        bias2 = 1 - self.beta2**self.steps
        with torch.no_grad():
            for key in self.names:
                g, p = grads[key], self.params[key]
                shape = (-1,) + (1,) * (p.dim() - 1)
                self.m[key].lerp_(g, 1 - self.beta1)
                self.v[key].mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (self.v[key].sqrt() / bias2.sqrt().reshape(shape)).add_(self.eps)
                p.addcdiv_(self.m[key], denom * (bias1 / self.lr).reshape(shape), value=-1)

    def write_back(self) -> None:
        for i, client in enumerate(self.clients):
            for j, key in enumerate(self.names):
                param = client.optim.param_groups[0]["params"][j]
                client.optim.state[param] = {
                    "step": torch.tensor(float(self.steps[i])),
                    "exp_avg": self.m[key][i : i + 1].clone(),
                    "exp_avg_sq": self.v[key][i : i + 1].clone(),
                }
