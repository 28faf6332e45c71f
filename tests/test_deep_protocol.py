"""The deep trainers share the core's round protocol pieces (issue 17 point 4, first slice).

- **One selection**: :func:`hbfl_pyro.deep.local.select_clients` and
  :meth:`hbfl_pyro.servers.ServerStrategy.select` both draw through
  :func:`hbfl_pyro.servers.base.select_indices`, which chooses exactly what each of them
  chose before (their former code is kept here as the reference).
"""

from types import SimpleNamespace

import pytest
import torch

from hbfl_pyro.deep import select_clients
from hbfl_pyro.seeding import derive_seed
from hbfl_pyro.servers import ServerStrategy
from hbfl_pyro.servers.base import select_indices


def former_deep_selection(num_clients, fraction, seed, server_round):
    """``deep.local.select_clients`` before the shared helper (verbatim)."""
    k = max(1, int(round(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "select"))
    return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())


def former_strategy_selection(names, fraction, seed, server_round):
    """``ServerStrategy.select`` before the shared helper (verbatim)."""
    n = len(names)
    k = max(1, int(round(fraction * n)))
    if k == n:
        return list(names)
    gen = torch.Generator().manual_seed(derive_seed(seed, server_round, "select"))
    chosen = torch.randperm(n, generator=gen)[:k].sort().values
    return [names[i] for i in chosen]


GRID = [
    (n, fraction, seed, r)
    for n in (1, 2, 5, 10, 37, 100)
    for fraction in (0.01, 0.1, 0.3, 0.5, 0.99, 1.0)
    for seed in (0, 7)
    for r in (1, 2, 13)
]


def test_one_selection_chooses_what_both_chose_before():
    for n, fraction, seed, r in GRID:
        before = former_deep_selection(n, fraction, seed, r)
        assert select_clients(n, fraction, seed, r) == before
        assert select_indices(n, fraction, seed, r) == before
        names = [f"c{i:03d}" for i in range(n)]
        strategy = SimpleNamespace(client_names=names, num_clients=n, fraction=fraction, seed=seed)
        chosen = ServerStrategy.select(strategy, r)  # type: ignore[arg-type]
        assert chosen == former_strategy_selection(names, fraction, seed, r)
        assert chosen == [names[i] for i in before]  # the core and deep see the same clients
    # Tags other than round numbers (the deep trainers' fine-tuning tags) seed alike.
    assert select_indices(10, 0.3, 4, "tag") == former_deep_selection(10, 0.3, 4, "tag")
    with pytest.raises(ValueError, match="fraction"):
        select_clients(10, 0.0, 0, 1)
