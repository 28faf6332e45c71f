"""Replaying a model over many draws: batched when the model broadcasts, else draw by draw.

The summary's deterministic sites and the ArviZ export rerun the model conditioned on the
posterior draws, all of them at once in a particle plate left of every model plate. A
model that is right under plain Pyro need not broadcast over such a leading dimension: a
scalar global times a vector global (``tau**2 * lam**2``), a matrix product ``x @ beta``,
or ``b[..., region]`` with the clients plate at dim -1 can raise, try to allocate
terabytes, or, worst, broadcast into a wrong value without an error.

:func:`batched_or_looped` therefore runs the batched computation, runs the first two
draws one at a time, and keeps the batched result only when it agrees with them; when the
batched run fails or disagrees, it computes every draw on its own (slower, and it warns
once, naming the computation, so the user knows why).

Example::

    >>> import torch
    >>> def computation(draws, first):  # a "model" that only works one draw at a time
    ...     if len(draws["x"]) > 1:
    ...         raise RuntimeError("shape mismatch")
    ...     return {"y": 2 * draws["x"]}
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     out = batched_or_looped(computation, {"x": torch.arange(3.0)}, "doubling")
    >>> out["y"]
    tensor([0., 2., 4.])
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Mapping, Set

import torch

#: Draws compared between the batched and the one-at-a-time computation.
CHECKED_DRAWS = 2
_WARNED: Set[str] = set()


def batched_or_looped(
    computation: Callable[[Dict[str, torch.Tensor], int], Dict[str, torch.Tensor]],
    draws: Mapping[str, torch.Tensor],
    what: str,
) -> Dict[str, torch.Tensor]:
    """``computation(draws, first)`` for ``draws`` ``{name: (n, ...)}`` returning ``{key:
    (n, ...)}``, batched when that equals the computation one draw at a time on the first
    :data:`CHECKED_DRAWS` draws, else draw by draw (with a warning naming ``what``).
    ``first`` is the index of the first draw passed (0 for the batched call), e.g. to seed
    each draw's random outputs apart.

    Outputs must be deterministic given the draws, except those whose key starts with
    ``"random:"`` (e.g. replicated data), which the check does not compare.
    """
    n = len(next(iter(draws.values())))
    try:
        batched = computation(dict(draws), 0)
        if _agrees(computation, draws, batched, min(n, CHECKED_DRAWS)):
            return batched
        reason = "its batched values differ from the same draws computed one at a time"
    except (RuntimeError, ValueError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if what not in _WARNED:  # once per computation and process, not once per client
        _WARNED.add(what)
        warnings.warn(
            f"{what}: the model does not broadcast over a leading dimension of draws "
            f"({reason}); computing the draws one at a time (correct, slower)",
            stacklevel=3,
        )
    return _looped(computation, draws, n)


def _one(draws: Mapping[str, torch.Tensor], j: int) -> Dict[str, torch.Tensor]:
    return {name: value[j : j + 1] for name, value in draws.items()}


def _looped(computation, draws, n: int) -> Dict[str, torch.Tensor]:
    parts = [computation(_one(draws, j), j) for j in range(n)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _agrees(computation, draws, batched: Dict[str, torch.Tensor], checked: int) -> bool:
    for j in range(checked):
        single = computation(_one(draws, j), j)
        for key, value in single.items():
            if key.startswith(_RANDOM):
                continue  # random outputs (replicated data) differ draw by draw anyway
            got = batched.get(key)
            if got is None or tuple(got.shape[1:]) != tuple(value.shape[1:]):
                return False
            if not torch.allclose(got[j : j + 1], value, rtol=1e-6, atol=1e-8, equal_nan=True):
                return False
    return True


#: Output keys starting with this are random (not compared by the check).
_RANDOM = "random:"


__all__ = ["CHECKED_DRAWS", "batched_or_looped"]
