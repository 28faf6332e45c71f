"""Networks as functions of one flat weight vector.

FedHB puts the prior on *all* weights of a client's network as one vector ``theta_i`` in
``R^d`` (method.md §4). :class:`FlatNet` views any :class:`torch.nn.Module` that way:
``FlatNet(net)(theta, x)`` runs ``net`` with its parameters replaced by the slices of
``theta`` (through :func:`torch.func.functional_call`), so the same module serves every
client, and ``torch.func.vmap`` over a stack of client vectors runs many clients at once.
The module's own parameters are only the layout (and the initial value); buffers
(e.g. batch-norm statistics) are the module's and are not part of ``theta``.
"""

from __future__ import annotations

from typing import Dict, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

__all__ = ["FlatNet", "WeightFunction", "mlp", "small_cnn"]


class WeightFunction(Protocol):
    """What the trainers need of a network: ``f(theta, x)``, and the length ``d`` of
    ``theta``. :class:`FlatNet` is one; so is pFedBayes's mean-field predictive
    (:class:`~hbfl_pyro.deep.personalised.MeanFieldNet`)."""

    d: int

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class FlatNet:
    """A module seen as ``f(theta, x)`` with ``theta`` its flattened parameters.

    The order of ``theta`` is that of :func:`torch.nn.utils.parameters_to_vector`
    (``net.parameters()`` order), so ``FlatNet(net).vector()`` round-trips with
    :meth:`load`.

    :param net: any module; it is used, not copied.

    Example::

        >>> import torch
        >>> net = mlp((4, 3, 2))
        >>> f = FlatNet(net)
        >>> f.d
        23
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(f(f.vector(), x), net(x))
        True
        >>> thetas = torch.stack([f.vector(), torch.zeros(f.d)])  # two clients
        >>> torch.func.vmap(f, in_dims=(0, None))(thetas, x).shape
        torch.Size([2, 5, 2])
    """

    def __init__(self, net: nn.Module):
        self.net = net
        named = list(net.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.d = sum(self.sizes)

    def vector(self) -> torch.Tensor:
        """The module's current parameters as one detached vector ``(d,)``."""
        return parameters_to_vector(self.net.parameters()).detach().clone()

    def load(self, theta: torch.Tensor) -> nn.Module:
        """Write ``theta`` into the module's parameters; returns the module."""
        with torch.no_grad():
            vector_to_parameters(theta.detach().to(self.vector().dtype), self.net.parameters())
        return self.net

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{parameter name: view of theta}`` (differentiable; works under ``vmap``)."""
        # One split, not one slice per tensor: the backward of a slice writes its gradient
        # into a zero tensor of the full size d, that of a split is a single cat.
        pieces = torch.split(theta, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output for input ``x`` with weights ``theta`` ``(d,)``."""
        return functional_call(self.net, self.unflatten(theta), (x,))


def mlp(sizes: Sequence[int] = (784, 200, 200, 10)) -> nn.Sequential:
    """A ReLU MLP that flattens its input first (so it takes ``(n, 1, 28, 28)`` images).

    The default is the MLP of evaluation.md §B, 784-200-200-10 (199,210 weights).
    """
    layers: list = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10, channels: int = 1) -> nn.Sequential:
    """A small CNN for 28x28 images: two 5x5 conv + max-pool blocks and two dense layers."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
