"""Replaying a model over many draws: batched when the model broadcasts, else draw by draw.

The summary's deterministic sites and the ArviZ export rerun the model conditioned on the
posterior draws, all of them at once in a particle plate left of every model plate. A
model that is right under plain Pyro need not broadcast over such a leading dimension: a
scalar global times a vector global (``tau**2 * lam**2``), a matrix product ``x @ beta``,
or ``b[..., region]`` with the clients plate at dim -1 can raise, try to allocate
terabytes, or, worst, broadcast into a wrong value without an error.

:func:`batched_or_looped` therefore runs the first two draws one at a time and the
batched computation, and keeps the batched result only when it agrees with them; when the
batched run fails or disagrees, it computes the remaining draws on their own (slower, and
the remaining draws are computed one at a time in plain Pyro's shapes, vectorised by
``torch.func.vmap`` when that too agrees with the checked draws (as fast as the batched
run), else in a Python loop (slow: it warns once, naming the computation, so the user
knows why). :func:`client_values` builds the conditioning values for either kind of run.

Example::

    >>> import torch
    >>> def computation(draws, index):  # a "model" that only works one draw at a time
    ...     if index is None:
    ...         raise RuntimeError("shape mismatch")
    ...     return {"y": 2 * draws["x"]}
    >>> out = batched_or_looped(computation, {"x": torch.arange(3.0)}, "doubling")
    >>> out["y"]
    tensor([0., 2., 4.])
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Mapping, Optional, Set

import torch
from torch.func import vmap

from .functional import functional_distributions

#: Draws compared between the batched and the one-at-a-time computation.
CHECKED_DRAWS = 2
_WARNED: Set[str] = set()


def pad_batch(draws: torch.Tensor, value_shape, event_dim: int, nesting: int, site: str):
    """Reshape ``(n, *value_shape)`` to ``(n, 1, ..., 1, *value_shape)`` whose batch part
    has ``nesting + 1`` dims, so that it broadcasts under a particle plate at
    ``dim=-(nesting + 1)`` exactly as a value drawn inside that plate would."""
    value_shape = tuple(value_shape)
    k = nesting - (len(value_shape) - event_dim)
    if k < 0:
        raise ValueError(
            f"site {site!r}: value shape {value_shape} has more batch dims than the model's "
            f"{nesting} plate dims"
        )
    return draws.reshape((draws.shape[0],) + (1,) * k + value_shape)


def client_values(
    global_draws: Mapping[str, torch.Tensor],
    own_local_draws: Mapping[str, torch.Tensor],
    structure,
    plain: bool = False,
) -> Dict[str, torch.Tensor]:
    """Conditioning values for one client's model run on draws ``(n, *shape)``.

    ``own_local_draws`` have the clients axis removed, as
    :meth:`FederatedSVI.local_samples` gives them for one client; the axis is put back as a
    size-1 plate dim. Under a particle plate (default) every value is padded to broadcast
    like a draw inside that plate (:func:`pad_batch`); ``plain``: the first draw's values
    in plain Pyro's shapes, for a run without one.
    """
    nesting = structure.max_plate_nesting
    event_dims = dict(structure.event_dims)
    values = {
        site: v[0] if plain else pad_batch(v, v.shape[1:], event_dims.get(site, 0), nesting, site)
        for site, v in global_draws.items()
    }
    for site, own in own_local_draws.items():
        shape, event_dim = tuple(own.shape[1:]), event_dims.get(site, 0)
        axis = max(len(shape) + 1 - event_dim + structure.plate_dim, 0)
        value_shape = shape[:axis] + (1,) + shape[axis:]
        values[site] = (
            own[0].reshape(value_shape)
            if plain
            else pad_batch(own, value_shape, event_dim, nesting, site)
        )
    return values


def batched_or_looped(
    computation: Callable[[Dict[str, torch.Tensor], Optional[int]], Dict[str, torch.Tensor]],
    draws: Mapping[str, torch.Tensor],
    what: str,
) -> Dict[str, torch.Tensor]:
    """``computation(draws, index)`` for ``draws`` ``{name: (n, ...)}`` returning ``{key:
    (n, ...)}``: batched (``index=None``: every draw at once) when that equals the
    computation one draw at a time (``index=j``: draw ``j`` alone, e.g. to run the model in
    plain Pyro's shapes and seed draw ``j``'s random outputs apart) on the first
    :data:`CHECKED_DRAWS` draws, else draw by draw (with a warning naming ``what``, once).

    Outputs must be deterministic given the draws, except those whose key starts with
    ``"random:"`` (e.g. replicated data), which the check does not compare.
    """
    n = len(next(iter(draws.values())))
    singles = [computation(_one(draws, j), j) for j in range(min(n, CHECKED_DRAWS))]
    try:
        batched = computation(dict(draws), None)
        if _agrees(batched, singles):
            return batched
        reason = "its batched values differ from the same draws computed one at a time"
    except (RuntimeError, ValueError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    vmapped = _vmapped(computation, draws, singles)
    if vmapped is not None:
        return vmapped
    if what not in _WARNED:  # once per computation and process, not once per client
        _WARNED.add(what)
        warnings.warn(
            f"{what}: the model does not broadcast over a leading dimension of draws "
            f"({reason}); computing the draws one at a time (correct, slower)",
            stacklevel=3,
        )
    # The checked draws are already computed: only the rest remain.
    parts = singles + [computation(_one(draws, j), j) for j in range(len(singles), n)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _vmapped(computation, draws: Mapping[str, torch.Tensor], singles):
    """Every draw computed as one draw in plain Pyro's shapes, vectorised over the draws by
    ``torch.func.vmap`` (random outputs differ per draw); ``None`` when the model cannot
    run under vmap (e.g. Python control flow on a value) or disagrees with ``singles``."""
    n = len(next(iter(draws.values())))

    def one_draw(draw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return computation({name: value.unsqueeze(0) for name, value in draw.items()}, 0)

    try:
        with functional_distributions():  # no in-place writes under vmap
            out = vmap(one_draw, randomness="different")(dict(draws))
    except Exception:  # any failure under vmap means: loop instead (checked below too)
        return None
    # Each draw's output has the leading size-1 dim of a one-draw run: fold it in.
    out = {key: value.reshape((n,) + tuple(value.shape[2:])) for key, value in out.items()}
    return out if _agrees(out, singles) else None


def _one(draws: Mapping[str, torch.Tensor], j: int) -> Dict[str, torch.Tensor]:
    return {name: value[j : j + 1] for name, value in draws.items()}


def _agrees(batched: Dict[str, torch.Tensor], singles) -> bool:
    for j, single in enumerate(singles):
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


__all__ = ["CHECKED_DRAWS", "batched_or_looped", "client_values", "pad_batch"]
