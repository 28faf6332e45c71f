"""Posterior summaries of a fitted :class:`~hbfl_pyro.FederatedSVI`: rows, CSV, and a table.

One row per scalar element of every site: global sites (``client`` empty), local sites
(one row per client and element), and deterministic sites (``pyro.deterministic``),
which are recomputed by replaying the model on each client's own data with draws of the
global and local sites (:func:`deterministic_samples`).

Size-1 batch dimensions that only come from broadcasting against plates (for example
``theta`` of shape ``(C, 1)`` under a clients plate at ``dim=-2``) are dropped, so a
per-client scalar has an empty ``index``; event dimensions are always kept.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union, cast

import pyro
import torch
from pyro import poutine

from .elbo import with_particles
from .guides import private_params
from .replay import batched_or_looped, client_values
from .structure import ModelStructure

COLUMNS = ("site", "client", "index", "mean", "sd", "q5", "q95")
Row = Dict[str, Union[str, float]]


# ---------------------------------------------------------------------------- draws
def drop_broadcast_dims(draws: torch.Tensor, lead: int, event_dim: int) -> torch.Tensor:
    """Drop size-1 batch dims of ``draws`` after its first ``lead`` dims; keep event dims."""
    shape = draws.shape[lead:]
    event_dim = min(event_dim, len(shape))
    batch, event = shape[: len(shape) - event_dim], shape[len(shape) - event_dim :]
    kept = tuple(size for size in batch if size != 1)
    return draws.reshape(draws.shape[:lead] + kept + tuple(event))


def deterministic_samples(
    model: Callable,
    batches: Mapping[str, Dict[str, torch.Tensor]],
    global_draws: Mapping[str, torch.Tensor],
    local_draws: Mapping[str, torch.Tensor],
    structure: ModelStructure,
    sites: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Draws of the model's deterministic sites, replaying the model on each client's data.

    Each client's model is run once, vectorised over the draws: conditioned
    (``poutine.condition``) on the global draws and on that client's local draws, inside
    a particle plate left of every model plate. Independent of
    :class:`~hbfl_pyro.FederatedSVI`: any draws of ``q(phi)`` and ``q_i(theta_i)`` will do.

    The event dims of a deterministic site are its ``event_dim`` when one was given to
    ``pyro.deterministic``; otherwise (Pyro then makes the whole value an event) they are
    what the value has beyond the ``max_plate_nesting + 1`` batch dims of the draws it
    was computed from. A site whose value has no leading draws dimension (e.g. one that
    reshapes or sums over the draws) is skipped with a warning.

    :param model: the Pyro model.
    :param batches: ``{client_name: collated one-client data}``, in the order of the
        clients axis of ``local_draws``.
    :param global_draws: ``{site: (n, *site_shape)}``, e.g.
        :meth:`FederatedSVI.global_samples`.
    :param local_draws: ``{site: (n, num_clients, *shape)}`` (the clients axis removed
        from each client's value), e.g. :meth:`FederatedSVI.local_samples`.
    :param structure: the model's :class:`~hbfl_pyro.ModelStructure`.
    :param sites: which deterministic sites (default: all of
        ``structure.deterministic_sites``).
    :returns: ``{site: {client_name: (n, *shape)}}``; a site outside the clients plate
        (a function of global sites only) has the single client name ``""``.

    Example::

        >>> draws = deterministic_samples(fit.model, {n: c.batch for n, c in fit.clients.items()},
        ...                               fit.global_samples(100), fit.local_samples(100),
        ...                               fit.structure)  # doctest: +SKIP
        >>> draws["theta"]["A"].shape  # doctest: +SKIP
        torch.Size([100])
    """
    sites = tuple(structure.deterministic_sites if sites is None else sites)
    out: Dict[str, Dict[str, torch.Tensor]] = {site: {} for site in sites}
    if not sites:
        return out
    nesting = structure.max_plate_nesting
    num_samples = next(iter(list(global_draws.values()) + list(local_draws.values()))).shape[0]
    inside: Dict[str, bool] = {}  # whether a site sits in the clients plate

    def replay(batch, draws: Dict[str, torch.Tensor], index) -> Dict[str, torch.Tensor]:
        n = len(next(iter(draws.values())))
        own_locals = {site: draws[site] for site in local_draws}
        own_globals = {site: draws[site] for site in global_draws}
        if index is None:  # every draw at once, in a particle plate
            values = client_values(own_globals, own_locals, structure)
            run = with_particles(poutine.condition(model, data=values), n, nesting)
        else:  # one draw, in plain Pyro's shapes
            values = client_values(own_globals, own_locals, structure, plain=True)
            run = poutine.condition(model, data=values)
        with private_params(), torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(run).get_trace(batch)
        found = {}
        for site in sites:
            node = trace.nodes[site]
            inside[site] = any(f.name == structure.plate for f in node["cond_indep_stack"])
            value = _align(node, n, nesting, structure.plate_dim)
            if value is not None:
                found[site] = value
        return found

    skipped = set()
    for i, (client, batch) in enumerate(batches.items()):
        draws = dict(global_draws)
        draws.update({site: v[:, i] for site, v in local_draws.items()})
        found = batched_or_looped(
            partial(replay, batch), draws, "the deterministic sites' model replay"
        )
        for site in sites:
            if site in skipped or (not inside.get(site, True) and i > 0):
                continue
            if site not in found:
                skipped.add(site)
                out.pop(site, None)
                warnings.warn(
                    f"deterministic site {site!r} is not summarised: its value has no "
                    f"leading dimension of the {num_samples} draws",
                    stacklevel=2,
                )
                continue
            out[site]["" if not inside.get(site, True) else client] = found[site]
    return out


def _align(node, num_samples: int, nesting: int, plate_dim: int) -> Optional[torch.Tensor]:
    """A deterministic value under the particle plate as ``(n, *shape)`` of one client."""
    value = node["value"]
    given = node["fn"].event_dim
    # pyro.deterministic defaults event_dim to value.ndim; only a smaller one was chosen.
    event_dim = given if given < value.dim() else max(value.dim() - (nesting + 1), 0)
    batch_dims = value.dim() - event_dim
    if batch_dims > nesting + 1:
        return None
    value = value.reshape((1,) * (nesting + 1 - batch_dims) + tuple(value.shape))
    if value.shape[0] not in (1, num_samples):
        return None
    clients_axis = nesting + 1 + plate_dim
    if value.shape[clients_axis] != 1:
        return None
    value = value.expand((num_samples,) + tuple(value.shape[1:])).select(clients_axis, 0)
    return drop_broadcast_dims(value, 1, event_dim)


# ---------------------------------------------------------------------------- rows
def element_index(flat: int, shape) -> str:
    if not shape:
        return ""
    coords = []
    for size in reversed(tuple(shape)):
        coords.append(flat % size)
        flat //= size
    return "[" + ",".join(str(c) for c in reversed(coords)) + "]"


def _rows(site: str, client: str, draws: torch.Tensor) -> List[Row]:
    shape = tuple(draws.shape[1:])
    flat = draws.reshape(draws.shape[0], -1).to(torch.float64)
    mean = flat.mean(0)
    sd = flat.std(0) if flat.shape[0] > 1 else torch.zeros_like(mean)
    q5, q95 = torch.quantile(flat, torch.tensor([0.05, 0.95], dtype=flat.dtype), dim=0)
    return [
        {
            "site": site,
            "client": client,
            "index": element_index(j, shape),
            "mean": float(mean[j]),
            "sd": float(sd[j]),
            "q5": float(q5[j]),
            "q95": float(q95[j]),
        }
        for j in range(flat.shape[1])
    ]


def posterior_summary(
    fit, num_samples: int = 2000, seed: int = 0, deterministic: bool = True
) -> List[Row]:
    """Mean, sd and 5%/95% quantiles of every site of a fitted model, one row per element.

    Draws come from ``fit.global_samples`` and ``fit.local_samples`` under ``seed``,
    inside :func:`torch.random.fork_rng`: the caller's random state is left untouched
    and the summary is reproducible. Deterministic sites are recomputed per client
    by :func:`deterministic_samples` (in-process, on ``fit.clients``' data).

    :param fit: a :class:`~hbfl_pyro.FederatedSVI` (fitted or not).
    :param num_samples: draws per site.
    :param seed: seed of the draws.
    :param deterministic: also summarise ``pyro.deterministic`` sites.
    :returns: a list of dicts with keys ``site, client, index, mean, sd, q5, q95``:
        global sites first (``client == ""``), then local sites (one row per client
        name of ``fit.data.names`` and element), then deterministic sites. ``index``
        is ``""`` for a scalar, else e.g. ``"[0]"`` or ``"[1,2]"``.

    Example::

        >>> fit = FederatedSVI(model, clients)  # doctest: +SKIP
        >>> fit.run(100)  # doctest: +SKIP
        >>> print(format_table(posterior_summary(fit)))  # doctest: +SKIP
        site   client  index   mean     sd     q5    q95
        mu                     4.38  0.632   3.35   5.41
        ...
    """
    structure = fit.structure
    event_dims = dict(structure.event_dims)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        global_draws = fit.global_samples(num_samples)
        local_draws = fit.local_samples(num_samples, global_draws=global_draws)
        det = {}
        if deterministic and structure.deterministic_sites:
            batches = {name: fit.clients[name].batch for name in fit.data.names}
            det = deterministic_samples(fit.model, batches, global_draws, local_draws, structure)
    rows: List[Row] = []
    for site in structure.global_sites:
        draws = drop_broadcast_dims(global_draws[site], 1, event_dims.get(site, 0))
        rows += _rows(site, "", draws)
    for site in structure.local_sites:
        for i, client in enumerate(fit.data.names):
            draws = drop_broadcast_dims(local_draws[site][:, i], 1, event_dims.get(site, 0))
            rows += _rows(site, client, draws)
    for site, per_client in det.items():
        for client, draws in per_client.items():
            rows += _rows(site, client, draws)
    return rows


# ---------------------------------------------------------------------------- output
def write_csv(rows: Iterable[Row], path: Union[str, os.PathLike]) -> Path:
    """Write summary rows to ``path`` as CSV (header ``site,client,index,mean,sd,q5,q95``).

    Numbers are written at full precision; missing parent directories are created.

    :returns: the path written.

    Example::

        >>> write_csv(posterior_summary(fit), "runs/demo/summary.csv")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    return path


def format_number(x: float) -> str:
    """``x`` to 3 significant digits, in fixed notation unless very large or small.

    Example::

        >>> [format_number(v) for v in (4.3789, 0.012345, 1234.5, -0.5, 1.5e-7)]
        ['4.38', '0.0123', '1234', '-0.500', '1.50e-07']
    """
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= 6 or magnitude < -4:
        return f"{x:.2e}"
    return f"{x:.{max(0, 2 - magnitude)}f}"


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned plain-text table (text left-aligned, numbers right-aligned).

    Example::

        >>> print(format_table([{"site": "mu", "client": "", "index": "", "mean": 4.3789,
        ...                      "sd": 0.61, "q5": 3.4, "q95": 5.41}]))
        site  client  index  mean     sd    q5   q95
        mu                   4.38  0.610  3.40  5.41
    """
    numeric = ("mean", "sd", "q5", "q95")
    cells = [list(COLUMNS)] + [
        # The numeric columns hold floats (Row types every cell as text or number).
        [format_number(cast(float, r[c])) if c in numeric else str(r[c]) for c in COLUMNS]
        for r in rows
    ]
    widths = [max(len(row[j]) for row in cells) for j in range(len(COLUMNS))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, cell, w in zip(COLUMNS, row, widths)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
