"""Personalised-FL baselines on the shared round loop (evaluation.md §B): Ditto,
Per-FedAvg and a pFedBayes-style mean-field Bayesian method.

Each is a :class:`~hbfl_pyro.deep.fedhb.FederatedTrainer`: the same round loop
(:meth:`~hbfl_pyro.deep.fedhb.FederatedTrainer.step` and its hooks), the same client
sampling (:func:`~hbfl_pyro.deep.local.select_clients`, seeded by ``(seed, round)``), the same
minibatches (:func:`~hbfl_pyro.deep.local.batch_schedule`, seeded by
``(seed, round, client)``) and the same :meth:`finetune` protocol as FedAvg, FedProx and
FedHB, so that :func:`~hbfl_pyro.deep.metrics.evaluate` scores every method alike:

- **global**: :meth:`global_weights` on the balanced global test set;
- **personalised**: :meth:`finetune` — every client starts at the global model and trains
  ``finetune_epochs`` epochs on its own train split with the *method's own personal
  objective* (Ditto: the ``lambda/2 ||v - w||^2`` prox to the global model; Per-FedAvg:
  plain SGD at its adaptation step size ``alpha``; pFedBayes: the client ELBO with the
  global Gaussian as prior), then is scored on its test split. New clients likewise.
  (``finetune(..., clients=...)``, as ``evaluate`` calls it, starts training clients
  where :meth:`starts` puts them: the global model for all three.)

Ditto and pFedBayes also keep the *persistent* personal models their papers evaluate
(updated whenever a client takes part); :meth:`personal_weights` returns them, for
``evaluate(fit, split, personal=fit.personal_weights())``.

Which engine: Ditto runs the shared engines (``engine="vectorised"`` or ``"inprocess"``);
Per-FedAvg has its own step (two or three minibatches per step), vmapped or looped, tested
equal; pFedBayes draws fresh weight noise at every step and runs a loop.

One module, a little over 600 lines: the three baselines share their protocol and are
compared with each other (the layout of ``hbfl_pyro.deep`` is to be revisited as a whole,
issue 17).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from ..seeding import derive_seed
from ..servers.closed_form import client_multiplicities
from .fedhb import ClientLike, FederatedTrainer, weighted_sum
from .local import (
    LocalSpec,
    Penalty,
    QuadraticPenalty,
    _pad_stack,
    schedules_for,
    train_loop,
    train_vmap,
)
from .nets import WeightFunction

__all__ = [
    "Ditto",
    "MeanFieldNet",
    "PFedBayes",
    "PerFedAvg",
    "gaussian_kl",
    "gaussian_kl_prior_grad",
]


def _check_weighting(weighting: str) -> None:
    if weighting not in ("size", "equal"):
        raise ValueError(f"weighting must be 'size' or 'equal', got {weighting!r}")


# --------------------------------------------------------------------------------------
# Ditto
# --------------------------------------------------------------------------------------


class Ditto(FederatedTrainer):
    """Ditto (Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021, Algorithm 1).

    The global model ``w`` is trained by FedAvg. Every client ``k`` also keeps a personal
    model ``v_k`` (initialised at the network's initial weights). In round ``t`` each
    sampled client

    1. trains a copy of ``w^t`` with the local engine (FedAvg's local SGD) and sends it;
    2. updates its personal model, with the *received* ``w^t`` as anchor::

           v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t))

       (``F_k`` the mean minibatch cross-entropy; ``personal_epochs`` epochs, own
       minibatches, seeded by ``(seed, "ditto-personal", round, k)``);

    and the server averages the sent models (``weighting="size"``: FedAvg's ``n_k / n``).
    The personal prediction is ``v_k``. ``lambda = 0`` makes ``v_k`` purely local
    training; ``lambda -> infinity`` pins ``v_k`` to the global model (both tested).

    :param lam: Ditto's ``lambda`` (per example, on the mean loss).
    :param personal_epochs: epochs of the personal update per round (default: the local
        spec's ``epochs``).
    :param weighting: ``"size"`` or ``"equal"`` server average.
    :param kwargs: ``fraction``, ``local``, ``engine``, ``chunk_size``, ``seed``.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> clients = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
        >>> fit = Ditto(mlp((4, 5, 3)), clients, lam=0.1, local=LocalSpec(batch_size=8))
        >>> len(fit.run(2)), fit.personal_weights().shape
        (2, torch.Size([3, 43]))
    """

    STATE = {"weights": "weights", "personal": "personal"}
    SETTINGS = ("lam", "personal_epochs", "weighting")

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        *,
        lam: float = 0.1,
        personal_epochs: Optional[int] = None,
        weighting: str = "size",
        **kwargs,
    ):
        super().__init__(net, clients, **kwargs)
        if lam < 0:
            raise ValueError(f"Ditto's lam must be >= 0, got {lam}")
        _check_weighting(weighting)
        self.lam, self.weighting = float(lam), weighting
        self.personal_epochs = self.local.epochs if personal_epochs is None else personal_epochs
        self.weights = self.init.clone()
        self.personal = self.init.expand(self.num_clients, -1).clone()

    def penalty(self) -> Penalty:
        """The global model's local update is FedAvg's: no penalty."""
        return None

    def personal_penalty(self, anchor: Optional[torch.Tensor] = None) -> Penalty:
        """``lambda/2 ||v - anchor||^2`` per example (``anchor``: the global model)."""
        anchor = self.weights if anchor is None else anchor
        return QuadraticPenalty(anchor, self.lam, per_example=True) if self.lam else None

    def global_weights(self) -> torch.Tensor:
        return self.weights

    def personal_weights(self) -> torch.Tensor:
        """Every training client's persistent personal model ``v_k``, ``(N, d)``."""
        return self.personal

    def local_updates(
        self, server_round: int, chosen: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each chosen client's two updates of Algorithm 1: the global model's local
        training (FedAvg's) and its personal step (:meth:`personal_updates`). Both are the
        client's work, so both go through the failure handling: a client whose personal
        step raises or returns NaN / Inf is left out of the round like any failed client
        (its ``v_k`` is kept, its global model not averaged).

        :returns: ``(thetas, personal)``, the sent global models and the new ``v_k``,
            ``(C, d)`` each.
        """
        thetas = super().local_updates(server_round, chosen)
        return thetas, self.personal_updates(server_round, chosen)

    def personal_updates(self, server_round: int, chosen: List[int]) -> torch.Tensor:
        """The chosen clients' personal step, anchored at ``w^t`` (the model they received
        this round; the server has not updated it yet): their new ``v_k``, ``(C, d)``."""
        spec = LocalSpec(**{**self.local.__dict__, "epochs": self.personal_epochs})
        tag = ("ditto-personal", server_round)
        schedules = schedules_for(self.sizes, spec, self.seed, tag, chosen)
        data = [self.data[i] for i in chosen]
        rows = torch.tensor(chosen, device=self.personal.device)
        return self.train(self.personal[rows], data, schedules, self.personal_penalty(), spec)

    def aggregate(
        self, chosen: List[int], replies: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    ) -> Dict:
        """Keep the good clients' new ``v_k`` and average their global models.

        :param replies: :meth:`local_updates`' ``(thetas, personal)``; a tensor of global
            models alone (the former call) runs the personal step here first.
        """
        if isinstance(replies, torch.Tensor):
            thetas, personal = replies, self.personal_updates(self.round + 1, chosen)
        else:
            thetas, personal = replies
        self.personal[torch.tensor(chosen, device=self.personal.device)] = personal
        w = client_multiplicities(chosen, self.sizes, 1, self.weighting, thetas)
        self.weights = weighted_sum(w, thetas)
        return {}

    def finetune(
        self,
        data: Sequence[ClientLike],
        epochs: int,
        tag: str = "finetune",
        clients: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Personalise by Ditto's personal objective: start at ``w``, train ``epochs``
        epochs with ``lambda/2 ||v - w||^2`` (the shared protocol, see the module doc)."""
        spec, data, schedules = self.finetune_plan(data, epochs, tag)
        starts = self.weights if clients is None else self.starts(list(clients))
        return self.train(starts, data, schedules, self.personal_penalty(), spec)


# --------------------------------------------------------------------------------------
# Per-FedAvg
# --------------------------------------------------------------------------------------


def _batch_loss(net: WeightFunction, theta, x, y, mask):
    """Mean cross-entropy of a (possibly padded) minibatch."""
    ce = F.cross_entropy(net(theta, x), y, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp(min=1)


class PerFedAvg(FederatedTrainer):
    """Per-FedAvg (Fallah, Mokhtari & Ozdaglar, "Personalized Federated Learning with
    Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020).

    Clients minimise the MAML objective ``F_k(w - alpha grad f_k(w))`` by local steps on
    minibatches ``D, D'`` (and ``D''``)::

        w_tmp = w - alpha grad f(w; D)
        FO:  w <- w - beta grad f(w_tmp; D')                                  (variant "fo")
        HF:  w <- w - beta (I - alpha hess f(w; D'')) grad f(w_tmp; D')       (variant "hf")

    the Hessian-vector product exact (``torch.func.jvp`` of the gradient), ``f`` the mean
    minibatch cross-entropy, both steps plain SGD (``beta`` = the local spec's ``lr``).
    The server averages the returned models (the paper: equally over the sampled clients).

    **Budget**: a step consumes 2 (FO) or 3 (HF) consecutive minibatches of the client's
    usual :func:`~hbfl_pyro.deep.local.batch_schedule` (wrapping round to its start for the
    last step), so a round processes about the same examples as a FedAvg round.

    **Personalisation** (:meth:`finetune`): from the global model, plain SGD at step size
    ``alpha`` for ``finetune_epochs`` epochs (the shared protocol); ``adapt_steps=k``
    instead takes exactly ``k`` such steps on the first ``k`` minibatches (the paper
    evaluates after one step).

    :param alpha: the inner (adaptation) step size (default: the local ``lr``).
    :param variant: ``"fo"`` (first order) or ``"hf"`` (Hessian-free, exact HVP).
    :param adapt_steps: ``None`` (the epoch protocol) or the number of adaptation steps.
    :param weighting: ``"equal"`` (the paper) or ``"size"``.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> clients = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
        >>> fit = PerFedAvg(mlp((4, 5, 3)), clients, alpha=0.05, variant="hf",
        ...                 local=LocalSpec(batch_size=8, lr=0.02))
        >>> len(fit.run(2)), fit.finetune(clients, 1).shape
        (2, torch.Size([3, 43]))
    """

    STATE = {"weights": "weights"}
    SETTINGS = ("alpha", "variant", "adapt_steps", "weighting")

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        *,
        alpha: Optional[float] = None,
        variant: str = "fo",
        adapt_steps: Optional[int] = None,
        weighting: str = "equal",
        **kwargs,
    ):
        super().__init__(net, clients, **kwargs)
        if variant not in ("fo", "hf"):
            raise ValueError(f"Per-FedAvg variant must be 'fo' or 'hf', got {variant!r}")
        _check_weighting(weighting)
        if self.local.optimizer != "sgd" or self.local.momentum:
            raise ValueError(
                "Per-FedAvg's update rule is plain SGD: use LocalSpec(optimizer='sgd', "
                f"momentum=0), got {self.local.optimizer!r} with momentum {self.local.momentum}"
            )
        self.alpha = self.local.lr if alpha is None else float(alpha)
        self.variant, self.adapt_steps, self.weighting = variant, adapt_steps, weighting
        self.weights = self.init.clone()

    def penalty(self) -> Penalty:
        return None

    def global_weights(self) -> torch.Tensor:
        return self.weights

    def aggregate(self, chosen: List[int], thetas: torch.Tensor) -> Dict:
        w = client_multiplicities(chosen, self.sizes, 1, self.weighting, thetas)
        self.weights = weighted_sum(w, thetas)
        return {}

    # ------------------------------------------------------------------ the meta step
    def _step_fn(self):
        net, alpha, beta, hf = self.net, self.alpha, self.local.lr, self.variant == "hf"
        g = grad(lambda t, x, y, m: _batch_loss(net, t, x, y, m))

        def step(theta, xa, ya, ma, xb, yb, mb, xc=None, yc=None, mc=None):
            outer = g(theta - alpha * g(theta, xa, ya, ma), xb, yb, mb)
            if hf:
                # hess f(theta; D'') outer, exactly, as the directional derivative of grad f.
                _, hvp = jvp(lambda t: g(t, xc, yc, mc), (theta,), (outer,))
                outer = outer - alpha * hvp
            return theta - beta * outer

        return step

    def _groups(self, schedules) -> List[List[Tuple[torch.Tensor, ...]]]:
        """Each client's steps: consecutive groups of 2 (FO) or 3 (HF) minibatches, the
        last group wrapping round to the first minibatches."""
        k = 3 if self.variant == "hf" else 2
        out = []
        for batches in schedules:
            count = math.ceil(len(batches) / k)
            out.append(
                [tuple(batches[(s * k + j) % len(batches)] for j in range(k)) for s in range(count)]
            )
        return out

    def train(self, starts, data, schedules, penalty: Penalty = None, spec=None) -> torch.Tensor:
        """The clients' Per-FedAvg local steps (``penalty`` and ``spec`` are not used: the
        update rule is fixed; ``starts`` ``(d,)`` or ``(C, d)``)."""
        starts = starts.expand(len(data), -1) if starts.dim() == 1 else starts
        groups = self._groups(schedules)
        step = self._step_fn()
        if not data:
            return starts.new_zeros((0, self.net.d))
        if self.engine == "inprocess":
            out = []
            for theta, (x, y), steps in zip(starts, data, groups):
                theta = theta.detach().clone()
                for batches in steps:
                    args = []
                    for idx in batches:
                        args += [x[idx], y[idx], x.new_ones(len(idx))]
                    theta = step(theta, *args).detach()
                out.append(theta)
            return torch.stack(out)
        return self._train_vmap(starts, data, groups, step)

    def _train_vmap(self, starts, data, groups, step) -> torch.Tensor:
        count, k = len(data), 3 if self.variant == "hf" else 2
        dtype, device = starts.dtype, starts.device
        x, y = _pad_stack([d[0] for d in data]), _pad_stack([d[1] for d in data])
        num_steps = max(len(g) for g in groups)
        width = max(len(b) for g in groups for s in g for b in s)
        # Built on the host and moved once (as in local.train_vmap): one small copy per
        # (step, batch, client) would dominate a GPU round.
        index = torch.zeros((num_steps, k, count, width), dtype=torch.long)
        mask = torch.zeros((num_steps, k, count, width), dtype=dtype)
        for c, steps in enumerate(groups):
            for s, batches in enumerate(steps):
                for j, b in enumerate(batches):
                    index[s, j, c, : len(b)] = b
                    mask[s, j, c, : len(b)] = 1.0
        index, mask = index.to(device), mask.to(device)
        active = mask[:, 0].amax(-1) > 0
        batched = vmap(step)
        theta = starts.detach().clone()
        for s in range(num_steps):
            live = active[s].nonzero().squeeze(1)
            sub = live[:, None]
            args = []
            for j in range(k):
                idx = index[s, j, live]
                args += [x[sub, idx], y[sub, idx], mask[s, j, live]]
            theta[live] = batched(theta[live], *args).detach()
        return theta

    def finetune(
        self,
        data: Sequence[ClientLike],
        epochs: int,
        tag: str = "finetune",
        clients: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Personalise: plain SGD at ``alpha`` from the global model (see the class doc)."""
        spec, data, schedules = self.finetune_plan(data, epochs, tag, lr=self.alpha)
        if self.adapt_steps is not None:
            schedules = [s[: self.adapt_steps] for s in schedules]
        starts = self.weights if clients is None else self.starts(list(clients))
        if self.engine == "inprocess":
            return train_loop(self.net, starts, data, schedules, spec, None)
        return train_vmap(self.net, starts, data, schedules, spec, None, self.chunk_size)


# --------------------------------------------------------------------------------------
# pFedBayes
# --------------------------------------------------------------------------------------


def gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) -> torch.Tensor:
    """``KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2))`` summed over coordinates::

        sum log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2

    Example::

        >>> import torch
        >>> from torch.distributions import Normal, kl_divergence
        >>> a, b = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0])
        >>> c, d = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.7])
        >>> bool(torch.isclose(gaussian_kl(a, b, c, d), kl_divergence(Normal(a, b),
        ...                                                          Normal(c, d)).sum()))
        True
    """
    ratio = (sigma_q / sigma_p) ** 2
    return 0.5 * (ratio + ((mu_q - mu_p) / sigma_p) ** 2 - 1.0 - ratio.log()).sum(-1)


def gaussian_kl_prior_grad(mu_q, sigma_q, mu_p, rho_p) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of :func:`gaussian_kl` with respect to the *prior's*
    ``(mu_p, rho_p)``, ``sigma_p = softplus(rho_p)`` (pFedBayes' localized-global step)::

        d/d mu_p  = (mu_p - mu_q) / sigma_p^2
        d/d rho_p = (1 / sigma_p - (sigma_q^2 + (mu_q - mu_p)^2) / sigma_p^3) sigmoid(rho_p)
    """
    sigma_p = F.softplus(rho_p)
    diff = mu_q - mu_p
    g_mu = -diff / sigma_p**2
    g_sigma = 1.0 / sigma_p - (sigma_q**2 + diff**2) / sigma_p**3
    return g_mu, g_sigma * torch.sigmoid(rho_p)


class MeanFieldNet:
    """A network whose "weights" are a mean-field Gaussian: ``theta = (mu, rho)`` of
    length ``2 d``, ``sigma = softplus(rho)``. Called, it returns the log of the
    Monte Carlo average of the class probabilities over ``samples`` weight draws, which
    :func:`~hbfl_pyro.deep.metrics.predict` and :func:`~hbfl_pyro.deep.metrics.scores`
    use as logits (``log_softmax`` leaves log-probabilities unchanged). The draws come
    from a generator seeded by ``seed`` at every call: every input, chunk and client sees
    the same ``samples`` standard-normal draws, so predictions are reproducible.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import FlatNet, mlp
        >>> base = FlatNet(mlp((4, 3, 2)))
        >>> f = MeanFieldNet(base, samples=5)
        >>> theta = torch.cat([base.vector(), torch.full((base.d,), -5.0)])
        >>> out = f(theta, torch.randn(6, 4))
        >>> out.shape, bool(torch.allclose(out.exp().sum(-1), torch.ones(6)))
        (torch.Size([6, 2]), True)
    """

    def __init__(self, base: WeightFunction, samples: int = 10, seed: int = 0):
        self.base, self.samples, self.seed = base, int(samples), seed
        self.d = 2 * base.d

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d = self.base.d
        mu, sigma = theta[:d], F.softplus(theta[d:])
        gen = torch.Generator(device=theta.device).manual_seed(self.seed)
        noise = torch.randn(
            (self.samples, d), generator=gen, dtype=theta.dtype, device=theta.device
        )
        logits = vmap(self.base, in_dims=(0, None))(mu + sigma * noise, x)
        return torch.logsumexp(logits.log_softmax(-1), 0) - math.log(self.samples)


class PFedBayes(FederatedTrainer):
    """A pFedBayes-style mean-field Bayesian baseline (Zhang, Li, Li, Wang & Zhang,
    "Personalized Federated Learning via Variational Bayesian Inference", ICML 2022,
    Algorithm 1).

    Client ``i`` keeps a personal posterior ``q_i(w) = N(mu_i, sigma_i^2)`` (mean field,
    ``sigma = softplus(rho)``); the server holds a global Gaussian ``z = N(mu_z, sigma_z^2)``.
    In a round each sampled client copies ``z`` into its *localized global* model
    ``p = (mu_p, rho_p)`` and, for every minibatch ``B`` of its schedule,

    1. takes ``personal_steps`` SGD (or Adam) steps on its personal ``(mu_i, rho_i)`` for::

           (1 / |B|) sum_{b in B} E_q_i[CE(f(w, x_b), y_b)] + (zeta / n_i) KL(q_i || p)

       the expectation by ``train_samples`` reparameterised draws ``w = mu + sigma eps``;
    2. takes one step on ``p`` for ``(zeta / n_i) KL(q_i || p)`` (closed-form gradient,
       :func:`gaussian_kl_prior_grad`), step size ``global_lr``;

    and sends ``p``; the server sets ``z <- (1 - beta) z + beta * average(p)``. Prediction
    averages class probabilities over ``predict_samples`` weight draws
    (:class:`MeanFieldNet`); the global model is ``z``, the personal ones ``q_i``.

    Everything is a flat vector ``(mu, rho)`` of length ``2 d``: :attr:`net` is the
    :class:`MeanFieldNet`, so :func:`~hbfl_pyro.deep.metrics.evaluate` works unchanged.
    Runs a loop over clients (fresh weight noise every step, from a generator seeded by
    ``(seed, round, client)``).

    :param zeta: weight of the KL term (``1``: the client's ELBO with prior ``p``).
    :param init_rho: initial ``rho`` of ``z`` and every ``q_i`` (``-2``: ``sigma`` about
        0.13). The prior's scale sets how tightly ``q_i`` is tied to it: the KL term is a
        prox of weight ``zeta / (n_i sigma_p^2)`` per example on ``mu_i``, so a small
        ``sigma`` freezes the clients at the global mean (``rho = -4``: weight about 20 for
        150 examples, and no learning in 10 rounds on MNIST), and SGD on either block is
        stable only while ``lr * zeta / (n_i sigma_p^2) < 2``.
    :param global_lr: step size of the localized global update (default: local ``lr``).
    :param personal_steps: personal steps per minibatch (the paper's inner loop).
    :param beta: the server's mixing weight.
    :param train_samples: weight draws per personal step.
    :param predict_samples: weight draws for prediction.
    :param weighting: ``"equal"`` (the paper) or ``"size"`` average of the ``p``.

    Example::

        >>> import torch
        >>> from hbfl_pyro.deep import LocalSpec, mlp
        >>> clients = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
        >>> fit = PFedBayes(mlp((4, 5, 3)), clients, local=LocalSpec(batch_size=8))
        >>> len(fit.run(2)), fit.global_weights().shape, fit.personal_weights().shape
        (2, torch.Size([86]), torch.Size([3, 86]))
    """

    STATE = {"weights": "weights", "personal": "personal"}
    SETTINGS = (
        "zeta",
        "beta",
        "global_lr",
        "personal_steps",
        "train_samples",
        "weighting",
    )

    def __init__(
        self,
        net: nn.Module,
        clients: Sequence[ClientLike],
        *,
        zeta: float = 1.0,
        init_rho: float = -2.0,
        global_lr: Optional[float] = None,
        personal_steps: int = 1,
        beta: float = 1.0,
        train_samples: int = 1,
        predict_samples: int = 10,
        weighting: str = "equal",
        **kwargs,
    ):
        super().__init__(net, clients, **kwargs)
        _check_weighting(weighting)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"pFedBayes' beta must be in (0, 1], got {beta}")
        if zeta < 0 or personal_steps < 1 or train_samples < 1 or predict_samples < 1:
            raise ValueError(
                "pFedBayes needs zeta >= 0 and personal_steps, train_samples, predict_samples "
                f">= 1; got {zeta}, {personal_steps}, {train_samples}, {predict_samples}"
            )
        self.base = self.net
        self.net = MeanFieldNet(self.base, predict_samples, seed=derive_seed(self.seed, "predict"))
        mu0 = self.init
        self.init = torch.cat([mu0, torch.full_like(mu0, float(init_rho))])
        self.zeta, self.beta, self.weighting = float(zeta), float(beta), weighting
        self.global_lr = self.local.lr if global_lr is None else float(global_lr)
        self.personal_steps, self.train_samples = int(personal_steps), int(train_samples)
        self.weights = self.init.clone()
        self.personal = self.init.expand(self.num_clients, -1).clone()

    def penalty(self) -> Penalty:
        return None

    def global_weights(self) -> torch.Tensor:
        """``(mu_z, rho_z)``, length ``2 d``."""
        return self.weights

    def personal_weights(self) -> torch.Tensor:
        """Every training client's persistent ``(mu_i, rho_i)``, ``(N, 2 d)``."""
        return self.personal

    # ------------------------------------------------------------------ one client
    def personal_loss(self, q, prior, x, y, n, gen) -> torch.Tensor:
        """The personal objective of one minibatch (see the class doc), one MC estimate."""
        d = self.base.d
        mu, sigma = q[:d], F.softplus(q[d:])
        noise = torch.randn((self.train_samples, d), generator=gen, dtype=q.dtype, device=q.device)
        weights = mu + sigma * noise
        if self.train_samples == 1:
            nll = F.cross_entropy(self.base(weights[0], x), y)
        else:
            logits = vmap(self.base, in_dims=(0, None))(weights, x)
            nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.train_samples))
        if not self.zeta:
            return nll
        prior_sigma = F.softplus(prior[d:])
        return nll + self.zeta / n * gaussian_kl(mu, sigma, prior[:d], prior_sigma)

    def client_update(
        self,
        q: torch.Tensor,
        prior: torch.Tensor,
        data: Tuple[torch.Tensor, torch.Tensor],
        batches: Sequence[torch.Tensor],
        gen: torch.Generator,
        spec: LocalSpec,
        update_prior: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2 of the class doc over ``batches``; returns ``(q_i, p)`` (with
        ``update_prior=False`` the prior stays fixed: personalisation)."""
        d = self.base.d
        x, y = data
        n = float(len(y))
        q = q.detach().clone().requires_grad_(True)
        prior = prior.detach().clone()

        def make(param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
            if spec.optimizer == "adam":
                return torch.optim.Adam([param], lr=lr)
            return torch.optim.SGD([param], lr=lr, momentum=spec.momentum)

        opt_q = make(q, spec.lr)
        if update_prior:
            prior.requires_grad_(True)
            opt_p = make(prior, self.global_lr)
        for idx in batches:
            for _ in range(self.personal_steps):
                opt_q.zero_grad()
                self.personal_loss(q, prior.detach(), x[idx], y[idx], n, gen).backward()
                opt_q.step()
            if update_prior and self.zeta:
                with torch.no_grad():
                    g_mu, g_rho = gaussian_kl_prior_grad(
                        q[:d], F.softplus(q[d:]), prior[:d], prior[d:]
                    )
                    prior.grad = torch.cat([g_mu, g_rho]) * (self.zeta / n)
                opt_p.step()
        return q.detach(), prior.detach()

    def _generator(self, *tag) -> torch.Generator:
        gen = torch.Generator(device=self.init.device)
        return gen.manual_seed(derive_seed(self.seed, "pfedbayes", *tag))

    def local_updates(
        self, server_round: int, chosen: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2 of the class doc for each chosen client, one after another (fresh
        weight noise from a generator seeded by ``(seed, round, client)``); returns their
        localized global models ``p`` and new ``q_i``, both ``(C, 2 d)`` (the ``q_i`` are
        stored by :meth:`aggregate_round`, for the clients that did not fail)."""
        schedules = schedules_for(self.sizes, self.local, self.seed, server_round, chosen)
        priors, personal = [], []
        for i, batches in zip(chosen, schedules):
            gen = self._generator(server_round, i)
            q, p = self.client_update(
                self.personal[i], self.weights, self.data[i], batches, gen, self.local
            )
            personal.append(q)
            priors.append(p)
        return torch.stack(priors), torch.stack(personal)

    def aggregate_round(self, server_round: int, chosen: List[int], replies) -> Dict:
        """Keep the clients' new ``q_i``, then the server update (:meth:`aggregate`)."""
        priors, personal = replies
        for i, q in zip(chosen, personal):
            self.personal[i] = q
        return self.aggregate(chosen, priors)

    def aggregate(self, chosen: List[int], thetas: torch.Tensor) -> Dict:
        """``z <- (1 - beta) z + beta * average(p)``."""
        w = client_multiplicities(chosen, self.sizes, 1, self.weighting, thetas)
        self.weights = (1 - self.beta) * self.weights + self.beta * weighted_sum(w, thetas)
        return {"global_sigma": float(F.softplus(self.weights[self.base.d :]).mean())}

    def finetune(
        self,
        data: Sequence[ClientLike],
        epochs: int,
        tag: str = "finetune",
        clients: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Personalise: each client starts ``q_i = z`` and takes the personal steps for
        ``epochs`` epochs with ``z`` as the fixed prior (see the module doc)."""
        spec, data, schedules = self.finetune_plan(data, epochs, tag)
        starts = self.weights if clients is None else self.starts(list(clients))
        starts = starts.expand(len(data), -1) if starts.dim() == 1 else starts
        out = [
            self.client_update(
                start, self.weights, pair, batches, self._generator(tag, k), spec, False
            )[0]
            for k, (start, pair, batches) in enumerate(zip(starts, data, schedules))
        ]
        return torch.stack(out) if out else self.weights.new_zeros((0, self.net.d))
