"""The small deep-FL federation the deep protocol tests share: six clients of 4 features
and 3 classes (sizes 5-20), a 4-6-3 MLP in float64, and the trainers' common options."""

import torch

from hbfl_pyro.deep import LocalSpec, mlp

OPTS = dict(fraction=0.5, local=LocalSpec(epochs=1, batch_size=4, lr=0.1), seed=3)


def toy(sizes=(20, 9, 14, 5, 12, 17), seed=0, nan=()):
    """``(net, clients)``; the clients in ``nan`` get one NaN feature (a failing client)."""
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        if i in nan:
            x[0, 1] = float("nan")
        clients.append((x, torch.randint(0, 3, (n,), generator=gen)))
    torch.manual_seed(seed)
    return mlp((4, 6, 3)).double(), clients


def break_client(fit, client, message="disk on fire"):
    """Make a deep trainer's ``client`` raise whenever its data are trained; returns the
    trainer's own ``train`` (to restore it)."""
    x_bad = fit.data[client][0]
    original = fit.train

    def train(starts, data, schedules, penalty=None, spec=None):
        if any(x is x_bad for x, _ in data):
            raise RuntimeError(message)
        return original(starts, data, schedules, penalty, spec)

    fit.train = train
    return original
