"""The two factors of the guide: ``q(phi)`` (server) and ``q_i(theta_i)`` (client i).

Guides are :class:`~pyro.nn.PyroModule` objects (every Pyro autoguide is one). The
library runs them with ``pyro.settings.context(module_local_params=True)`` so that
their parameters live in the module, never in Pyro's global parameter store: each party
owns a private copy (architecture rule 5), and a state dict of plain tensors is what
crosses between parties.

By default the global factor is an :class:`~pyro.infer.autoguide.AutoNormal` over the
global sites and the local factor an ``AutoNormal`` over the local sites, both built from
the model blocked to those sites (Pyro autoguides "split by role"). Users may pass any
autoguide class (``AutoDelta``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``
for the global factor) or their own ``PyroModule`` guides taking the model's arguments.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from typing import Callable, Dict, Set, Tuple, TypeVar

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample

from ..data import num_clients
from ..structure import ModelStructure
from .base import builds_itself
from .laplace import LaplaceLocalNormal
from .spline import AutoSplineMultivariateNormal
from .structured import StructuredLocalNormal

# Any module type: copy_module returns a copy of the same type.
_ModuleT = TypeVar("_ModuleT", bound=torch.nn.Module)

# Every family starts where AutoNormal starts (init_to_feasible): the correlated autoguides'
# own default, init_to_median, estimates medians from prior draws, which overflow for
# very vague priors (surgical's InverseGamma(0.001, 0.001)).
_FULL_RANK = functools.partial(AutoMultivariateNormal, init_loc_fn=init_to_feasible)
_LOW_RANK = functools.partial(AutoLowRankMultivariateNormal, init_loc_fn=init_to_feasible)

#: Named guide families: ``name -> (global guide, local guide)``. Every family but
#: ``"mean-field"`` needs the gradient server (no closed-form family matches them).
GUIDE_FAMILIES = {
    # "auto" is AutoNormal, and leaves the closed-form server available (a conjugate
    # family owns q(phi) itself and takes no global guide).
    "mean-field": ("auto", "auto"),
    "structured": (AutoNormal, StructuredLocalNormal),
    "full-rank": (_FULL_RANK, AutoNormal),
    "low-rank": (_LOW_RANK, AutoNormal),
    "full+struct": (_FULL_RANK, StructuredLocalNormal),
    "laplace": (AutoNormal, LaplaceLocalNormal),
    "full+laplace": (_FULL_RANK, LaplaceLocalNormal),
    "spline+laplace": (AutoSplineMultivariateNormal, LaplaceLocalNormal),
}


def guide_family(name: str) -> Dict[str, object]:
    """The :class:`~hbfl_pyro.FederatedSVI` keywords of a named guide family.

    ``"mean-field"`` is the library's default, ``AutoNormal`` for ``q(phi)`` and for each
    ``q_i(theta_i)`` (``"auto"``: a conjugate model fitted first-order keeps its
    closed-form server);
    ``"structured"`` swaps the local factor for :class:`~hbfl_pyro.StructuredLocalNormal`,
    ``q_i(theta_i | phi)``; ``"full-rank"`` and ``"low-rank"`` correlate the globals
    (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``); ``"full+struct"`` does
    both. ``"laplace"`` and ``"full+laplace"`` take :class:`~hbfl_pyro.LaplaceLocalNormal`,
    ``q_i(theta_i | phi)`` from Newton's method on the client's conditional (any non-linear
    dependence on ``phi``, exact for Gaussian conditionals), with a mean-field or a
    full-rank ``q(phi)``; ``"spline+laplace"`` gives the full-rank ``q(phi)`` learned
    non-Gaussian marginals (:class:`~hbfl_pyro.AutoSplineMultivariateNormal`: a skewed
    ``log tau``). All but ``"mean-field"`` set ``server="gradient"``.

    Example::

        >>> sorted(guide_family("structured"))
        ['global_guide', 'local_guide', 'server']
    """
    if name not in GUIDE_FAMILIES:
        raise GuideError(
            f"unknown guide family {name!r}; choose one of {', '.join(GUIDE_FAMILIES)}"
        )
    global_guide, local_guide = GUIDE_FAMILIES[name]
    options: Dict[str, object] = {"global_guide": global_guide, "local_guide": local_guide}
    if name != "mean-field":
        options["server"] = "gradient"
    return options


@contextmanager
def private_params():
    """Keep PyroModule parameters inside their modules (no shared param store)."""
    with pyro.settings.context(module_local_params=True):
        yield


class GuideError(ValueError):
    """A guide does not match the model."""


def _clients_plate(structure: ModelStructure):
    def create_plates(batch, *args, **kwargs):
        return pyro.plate(structure.plate, num_clients(batch), dim=structure.plate_dim)

    return create_plates


def is_autoguide_spec(guide) -> bool:
    """An autoguide class, or a ``functools.partial`` of one (an autoguide class with some
    of its keywords fixed, e.g. ``partial(AutoMultivariateNormal, init_scale=0.01)``)."""
    if isinstance(guide, functools.partial):
        guide = guide.func
    return isinstance(guide, type) and issubclass(guide, AutoGuide)


def build_global_guide(model: Callable, structure: ModelStructure, placeholder, guide="auto"):
    """The server's ``q(phi)``: an autoguide class / ``"auto"`` or a user module.

    A user-supplied module is deep-copied: training never changes the caller's object.
    Raises :class:`GuideError` (naming the site) unless the guide samples exactly the
    model's global sites, with the model's shapes, reparameterisably.
    """
    blocked = poutine.block(model, expose=list(structure.global_sites))
    if isinstance(guide, str) and guide == "auto":
        guide = AutoNormal
    if is_autoguide_spec(guide):
        with private_params():
            guide = guide(blocked)
    else:
        guide = _own_copy(guide, "global")
    with private_params(), pyro.validation_enabled(False):
        trace = _trace_guide(guide, placeholder, "global", "a data-free placeholder input")
        model_trace = _model_trace(model, placeholder)
    _check_covers(trace, structure.global_sites, "global", structure, model_trace)
    return guide


def build_local_guide(
    model: Callable, structure: ModelStructure, batch, guide="auto", client: str = ""
):
    """Client ``i``'s own ``q_i(theta_i)``: a fresh module prototyped on its own data.

    A user-supplied module is deep-copied, so no two clients share parameters (and the
    caller's object is never trained). ``client`` names the client in errors.
    """
    blocked = poutine.block(model, expose=list(structure.local_sites))
    if isinstance(guide, str) and guide == "auto":
        guide = AutoNormal
    if is_autoguide_spec(guide):
        with private_params():
            guide = guide(blocked, create_plates=_clients_plate(structure))
    elif builds_itself(guide):
        with private_params():  # e.g. StructuredLocalNormal: the class builds its own
            guide = guide.for_client(model, structure, batch)
    else:
        guide = _own_copy(guide, "local")
    with private_params():
        trace = _trace_guide(guide, batch, "local", f"client {client!r}'s data" if client else "")
        model_trace = _model_trace(model, batch)
    _check_covers(trace, structure.local_sites, "local", structure, model_trace, client)
    return guide


def _own_copy(guide, role: str) -> PyroModule:
    """A private deep copy of a user's guide module, usable with module-local parameters.

    The copy keeps the user's object untouched (training never changes it, so a second
    run with the same arguments starts from the same state).
    """
    if not isinstance(guide, PyroModule):
        raise GuideError(
            f"the {role} guide must be 'auto', an autoguide class (e.g. AutoNormal, or a "
            "functools.partial of one) or a "
            f"pyro.nn.PyroModule taking the model's arguments, got {type(guide).__name__} "
            f"{guide!r}; wrap a guide function in a PyroModule"
        )
    return with_private_state(copy_module(guide))


def copy_module(module: _ModuleT) -> _ModuleT:
    """A deep copy of a guide module, without the intermediate tensors it caches.

    Normalizing-flow transforms (``AffineAutoregressive``, ``Spline``, ...) keep tensors of
    their last forward pass as attributes, which ``copy.deepcopy`` refuses (they are not
    graph leaves); they are caches, recomputed on the next call, so the copy gets ``None``.
    """
    memo: Dict[int, None] = {}
    seen: Set[int] = set()

    def collect(value):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                memo[id(value)] = None
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            collect(vars(value))  # modules, transforms and their cached (x, y) pairs

    collect(module)
    return copy.deepcopy(module, memo)


def with_private_state(guide: PyroModule) -> PyroModule:
    """``guide`` itself, made usable with module-local parameters (:func:`private_params`).

    A ``PyroModule`` built outside ``module_local_params=True`` lacks the private parameter
    state Pyro needs in that mode; it is added here (to every submodule).
    """
    for module in guide.modules():
        context = getattr(module, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}
    return guide


def _model_trace(model, batch):
    """A trace of the model for the sites' shapes, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        return poutine.trace(model).get_trace(batch)


def _trace_guide(guide, batch, role: str, what: str):
    try:
        return poutine.trace(guide).get_trace(batch)
    except Exception as exc:
        on = f" on {what}" if what else ""
        raise GuideError(
            f"the {role} guide failed when run{on}: {type(exc).__name__}: {exc}; a guide "
            "takes the same arguments as the model (one collated data dict)"
        ) from exc


def _check_covers(
    trace,
    sites: Tuple[str, ...],
    role: str,
    structure: ModelStructure,
    model_trace=None,
    client: str = "",
) -> None:
    """The guide samples exactly the model's ``role`` sites, with the model's shapes."""
    sampled = {
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    missing = [s for s in sites if s not in sampled]
    if missing:
        raise GuideError(
            f"the {role} guide does not sample the model's {role} site(s) {missing}; "
            f"add `pyro.sample` statements for them to the {role} guide (or use an autoguide)"
        )
    other_role = structure.local_sites if role == "global" else structure.global_sites
    extra = [s for s in sampled if s in other_role or s in structure.observed_sites]
    if extra:
        raise GuideError(
            f"the {role} guide samples site(s) {extra} that are not {role} in the model; "
            "the global guide must cover exactly the global sites, the local guide the local ones"
        )
    where = f" (on client {client!r}'s data)" if client else ""
    for name in sites:
        if model_trace is not None and name in model_trace.nodes:
            got, want = trace.nodes[name]["value"].shape, model_trace.nodes[name]["value"].shape
            if got != want:
                hint = (
                    f"sample it inside `pyro.plate({structure.plate!r}, num_clients(data), "
                    f"dim={structure.plate_dim})` with the model's event shape"
                    if role == "local"
                    else "give it the model's batch and event shape"
                )
                raise GuideError(
                    f"the {role} guide's site {name!r} has shape {tuple(got)}{where}, but the "
                    f"model's site {name!r} has shape {tuple(want)}; {hint}"
                )
        if not trace.nodes[name]["fn"].has_rsample:
            raise GuideError(
                f"the {role} guide's site {name!r} is not reparameterisable; "
                "hbfl_pyro's blocks use pathwise gradients (use a continuous guide)"
            )


def parameters(guide) -> Dict[str, torch.Tensor]:
    """The guide's (unconstrained) parameters by name."""
    return dict(guide.named_parameters())


def local_moments(guide, site: str, num_samples: int = 4000) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and diagonal variance of ``q_i(theta_i)`` for one client, flattened to ``(d,)``.

    Exact for ``AutoNormal`` (real support) and ``AutoDelta``; other guides raise
    ``NotImplementedError``. The results are new tensors, never views of the guide's
    parameters: a summary built from them and sent to the server must not change when
    the client trains on.
    """
    with private_params():
        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale(site)
            return loc.reshape(-1).clone(), scale.pow(2).reshape(-1)
        if isinstance(guide, AutoDelta):
            loc = getattr(guide, site) if hasattr(guide, site) else guide.median()[site]
            return loc.reshape(-1).clone(), torch.zeros_like(loc).reshape(-1)
        raise NotImplementedError(
            "closed-form server families need the moments of q_i; use AutoNormal or AutoDelta "
            "as the local guide"
        )
