"""Explicit seeds for every random choice (architecture rule 7).

A seed is derived from ``(seed, round, client)`` so that a run is reproducible, a resumed
run continues exactly as an uninterrupted one, and a client's randomness does not depend
on which other clients took part in a round.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any sequence of ints and strings."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded, restoring the caller's RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
