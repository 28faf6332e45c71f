"""Discovery of the roles of a model's sample sites, and up-front validation.

The roles come from traces of the user's own Pyro model (architecture rule 1): a latent
site inside the clients plate is *local* (one value per client), a latent site outside it
is *global*, and observed sites must lie inside it. Everything here runs before any
training, and every error names the site (and the client) and says how to fix it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, Unit
from pyro.poutine.util import site_is_subsample

from .data import MASK_KEY, DataValidationError, FederatedData


class ModelStructureError(ValueError):
    """The model cannot be split into a server block and client blocks as written."""


@dataclass(frozen=True)
class ModelStructure:
    """The roles of a model's sites, discovered from traces.

    :ivar plate: name of the clients plate.
    :ivar plate_dim: the plate's (negative) batch dimension.
    :ivar global_sites: latent sites outside the plate (``phi``), in model order.
    :ivar local_sites: latent sites inside the plate (``theta_i``), in model order.
    :ivar observed_sites: observed sites (inside the plate).
    :ivar likelihood_globals: global sites the observed sites depend on directly
        ("fixed effects"); when non-empty no closed-form server update exists.
    :ivar max_plate_nesting: as Pyro's ELBOs use it.
    """

    plate: str
    plate_dim: int
    global_sites: Tuple[str, ...]
    local_sites: Tuple[str, ...]
    observed_sites: Tuple[str, ...]
    likelihood_globals: Tuple[str, ...]
    max_plate_nesting: int
    deterministic_sites: Tuple[str, ...] = ()
    event_dims: Tuple[Tuple[str, int], ...] = ()

    def event_dim(self, site: str) -> int:
        return dict(self.event_dims)[site]


def site_distribution(site: Any) -> TorchDistribution:
    """The distribution of a traced sample site.

    Pyro types a message's ``fn`` as any callable; at a ``"sample"`` site it is the
    site's distribution.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> trace = poutine.trace(lambda: pyro.sample("x", dist.Normal(0.0, 1.0))).get_trace()
        >>> site_distribution(trace.nodes["x"]).event_dim
        0
    """
    return cast(TorchDistribution, site["fn"])


def site_value(site: Any) -> torch.Tensor:
    """The value of a traced sample site.

    Pyro types a message's ``value`` as optional; a sample site that has run holds its
    drawn (or observed) tensor.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> trace = poutine.trace(lambda: pyro.sample("x", dist.Normal(0.0, 1.0))).get_trace()
        >>> site_value(trace.nodes["x"]).shape
        torch.Size([])
    """
    return cast(torch.Tensor, site["value"])


def _sample_sites(trace) -> Dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _in_plate(site, plate: str) -> bool:
    return any(frame.name == plate for frame in site["cond_indep_stack"])


DEFAULT_PLATE = "clients"


def _vectorised_plate_sizes(trace) -> Dict[str, int]:
    return {
        frame.name: frame.size
        for site in _sample_sites(trace).values()
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    }


def _one_entry_per_client(model: Callable, data: FederatedData, one) -> list:
    """The model's plates with one entry per client: of size 1 on one client's data and of
    size 2 on two clients' (empty when the federation has one client, where no size tells)."""
    if len(data) < 2:
        return []
    try:
        two = poutine.trace(model).get_trace(data.collate([0, 1]))
    except Exception:  # the caller's trace of one client worked; no plate can be told apart
        return []
    first, second = _vectorised_plate_sizes(one), _vectorised_plate_sizes(two)
    return [n for n, size in second.items() if size == 2 and first.get(n) == 1]


def _missing_plate_error(plate: str, candidates: list) -> ModelStructureError:
    """How to fix a model without the clients plate ``plate``: name the plate with one
    entry per client if there is exactly one such plate, else how to write it."""
    if len(candidates) == 1:
        found = candidates[0]
        fix = (
            f"the model's plate {found!r} has one entry per client: rename it {plate!r}, or "
            f"name it as the clients plate (FederatedSVI(..., plate={found!r}); in a model "
            f'file, fit_options = {{"plate": "{found}"}})'
        )
    else:
        fix = (
            f"wrap the per-client part of the model in `with pyro.plate({plate!r}, "
            "num_clients(data)):` (or name your clients plate: plate=NAME)"
        )
        if candidates:
            fix += f"; plates {candidates} each have one entry per client: name one"
    return ModelStructureError(f"no sample site is inside a plate named {plate!r}; " + fix)


def _find_clients_plate(model: Callable, data: FederatedData, one, plate: Optional[str]) -> str:
    """The clients plate's name: ``plate`` when given; else ``"clients"`` when the model has
    it, else the one plate with an entry per client (with a warning naming it, so a model
    written with ``pyro.plate("schools", ...)`` fits with defaults and says what it took)."""

    def has(name: str) -> bool:
        return any(_in_plate(site, name) for site in _sample_sites(one).values())

    if plate is not None:
        if not has(plate):
            raise _missing_plate_error(plate, _one_entry_per_client(model, data, one))
        return plate
    if has(DEFAULT_PLATE):
        return DEFAULT_PLATE
    candidates = _one_entry_per_client(model, data, one)
    if len(candidates) != 1:
        raise _missing_plate_error(DEFAULT_PLATE, candidates)
    found = candidates[0]
    warnings.warn(
        f"the model has no plate named {DEFAULT_PLATE!r}; its plate {found!r} has one entry "
        f"per client, so it is taken as the clients plate (pass plate={found!r}, or in a "
        f'model file fit_options = {{"plate": "{found}"}}, to say so and silence this)',
        UserWarning,
        stacklevel=3,
    )
    return found


def _trace(model: Callable, batch, what: str):
    try:
        return poutine.trace(model).get_trace(batch)
    except Exception as exc:
        raise ModelStructureError(
            f"the model failed when run on {what}: {type(exc).__name__}: {exc}; the model "
            "must run on the collated data of any subset of clients (keys as in the data, "
            "per-observation arrays padded to (clients, n_max, ...) with a 'mask')"
        ) from exc


def discover_structure(
    model: Callable, data: FederatedData, plate: Optional[str] = None
) -> ModelStructure:
    """Trace ``model`` on the clients' data, assign site roles, and validate them.

    :param model: a Pyro model taking one collated data dict.
    :param data: the federation's data (only used locally, as each client would).
    :param plate: the name of the clients plate; ``None`` (the default): ``"clients"``, or
        else the model's one plate with an entry per client, taken with a warning.
    :returns: the :class:`ModelStructure`.
    :raises ModelStructureError: naming the offending site (and client) and the fix.
    """
    one = _trace(model, data.collate([0]), f"client {data.names[0]!r}")
    sites = _sample_sites(one)
    plate = _find_clients_plate(model, data, one, plate)
    plate_dim = next(
        f.dim for s in sites.values() for f in s["cond_indep_stack"] if f.name == plate
    )
    for name, site in sites.items():
        # pyro.sample(..., obs_mask=m) splits a site into NAME_observed and a latent
        # NAME_unobserved (imputed values whose density is masked out): nothing identifies
        # them, so every server would fit noise (measured: an ELBO climbing without bound).
        stem = name[: -len("_unobserved")]
        if name.endswith("_unobserved") and f"{stem}_observed" in sites and not site["is_observed"]:
            raise ModelStructureError(
                f"site {stem!r} uses obs_mask= (imputing missing observations), which "
                "federated fitting does not support: its imputed values have no density to "
                f"fit. Drop the missing observations instead: observe {stem!r} with "
                "poutine.mask(mask=observed) (or .mask(observed)) and fill the missing "
                "entries with any valid value"
            )
    globals_, locals_, observed, deterministic = [], [], [], []
    for name, site in sites.items():
        inside = _in_plate(site, plate)
        if site["infer"].get("_deterministic"):
            deterministic.append(name)
        elif site["is_observed"]:
            if not inside:
                raise ModelStructureError(
                    f"observed site {name!r} is outside the {plate!r} plate: every "
                    f"observation belongs to a client; move it inside `pyro.plate({plate!r}, ...)`"
                )
            observed.append(name)
        elif inside:
            locals_.append(name)
        else:
            globals_.append(name)
    if not observed:
        raise ModelStructureError("the model has no observed site: pass the data as `obs=`")
    max_nesting = max(
        [-f.dim for s in sites.values() for f in s["cond_indep_stack"] if f.dim is not None] + [0]
    )
    _check_globals_are_global(model, data, one, globals_, plate)
    likelihood_globals = _likelihood_globals(model, data, one, globals_, observed, plate_dim)
    _check_mask_is_used(model, data, observed)
    return ModelStructure(
        plate=plate,
        plate_dim=plate_dim,
        global_sites=tuple(globals_),
        local_sites=tuple(locals_),
        observed_sites=tuple(observed),
        likelihood_globals=likelihood_globals,
        max_plate_nesting=max_nesting,
        deterministic_sites=tuple(deterministic),
        event_dims=tuple((n, s["fn"].event_dim) for n, s in sites.items()),
    )


def _check_globals_are_global(model, data, one, globals_, plate) -> None:
    """A global site's value shape and density must not depend on the clients' data.

    The densities are compared across every client and against the data-free placeholder
    the server runs the model on (so a single client, or clients that happen to share a
    value the prior uses, are checked too).
    """
    values = {name: one.nodes[name]["value"] for name in globals_}
    conditioned = poutine.condition(model, data=values)

    def global_log_probs(trace):
        return {name: trace.nodes[name]["fn"].log_prob(values[name]).sum() for name in globals_}

    def compare(log_probs, ref, other: str) -> None:
        for name in globals_:
            if not torch.allclose(log_probs[name], ref[name], rtol=1e-9, atol=1e-12):
                raise ModelStructureError(
                    f"the distribution of global site {name!r} depends on client data: it "
                    f"differs between client {data.names[0]!r} and {other}. A global prior "
                    "may only use constants or other global sites; compute data-dependent "
                    f"quantities inside the {plate!r} plate"
                )

    # Each client alone first (a model that fails on one client's data names it), then two
    # clients together (a global's shape must not depend on how many clients there are).
    if globals_:
        ref = global_log_probs(_trace(conditioned, data.collate([0]), f"client {data.names[0]!r}"))
        for i in range(1, len(data)):
            trace = _trace(conditioned, data.collate([i]), f"client {data.names[i]!r}")
            compare(global_log_probs(trace), ref, f"client {data.names[i]!r}")
    if len(data) > 1:
        two = _trace(model, data.collate([0, 1]), f"clients {data.names[:2]}")
        for name in globals_:
            a, b = one.nodes[name]["value"], two.nodes[name]["value"]
            if a.shape != b.shape:
                raise ModelStructureError(
                    f"site {name!r} has a value per client (shape {tuple(a.shape)} with one "
                    f"client, {tuple(b.shape)} with two) but is outside the {plate!r} plate; "
                    f"sample it inside `with pyro.plate({plate!r}, num_clients):`"
                )
    if not globals_:
        return
    # The placeholder's values need not lie in the likelihood's support, and a model may
    # not run on it at all (e.g. it indexes with data): then there is nothing to compare.
    try:
        with pyro.validation_enabled(False), torch.random.fork_rng(devices=[]):
            trace = poutine.trace(conditioned).get_trace(data.placeholder())
        placeholder = global_log_probs(trace)
    except Exception:
        return
    compare(placeholder, ref, "the data-free placeholder input the server uses")


def _likelihood_globals(model, data, one, globals_, observed, plate_dim) -> Tuple[str, ...]:
    """Globals that the observed sites' densities depend on, with the locals held fixed.

    The same one trace per client, run with Pyro's validation on, also checks that
    client's observations lie in their likelihoods' supports (:func:`_check_observations`).

    Found structurally: the model is run with every latent value given, the globals as
    leaves that require grad, and a global counts when the observed log density has a
    gradient path to it (``autograd.grad(..., allow_unused=True)`` is ``None`` only when
    there is none). Every client is checked, since a covariate may switch a global off
    for some clients (a zero regressor multiplies it out of the value, not of the graph).
    """
    del one  # each client is traced on its own data below
    found: set = set()
    for i in range(len(data)):
        batch = data.collate([i])
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(True):
            trace = _trace(model, batch, f"client {data.names[i]!r}")
            _check_observations(trace, batch, plate_dim, data.names[i])
        if len(found) == len(globals_):
            continue  # every global found: the remaining clients' traces only check data
        values = {
            n: s["value"].detach() for n, s in _sample_sites(trace).items() if not s["is_observed"]
        }
        for name in globals_:
            values[name] = values[name].clone().requires_grad_()
        with pyro.validation_enabled(False):
            conditioned = poutine.trace(poutine.condition(model, data=values)).get_trace(batch)
        log_p = sum(
            site_distribution(conditioned.nodes[n]).log_prob(site_value(conditioned.nodes[n])).sum()
            for n in observed
        )
        leaves = [values[name] for name in globals_]
        if not isinstance(log_p, torch.Tensor) or not log_p.requires_grad:
            continue
        grads = torch.autograd.grad(log_p, leaves, allow_unused=True)
        found |= {name for name, grad in zip(globals_, grads) if grad is not None}
    return tuple(name for name in globals_ if name in found)


def _data_key(batch, value) -> Optional[str]:
    """The data key whose collated tensor is an observed site's value, if any."""
    for key, tensor in batch.items():
        if tensor is value:
            return key
    for key, tensor in batch.items():
        if (
            key != MASK_KEY
            and tensor.shape == value.shape
            and tensor.dtype == value.dtype
            and torch.equal(tensor, value)
        ):
            return key
    return None


def _check_observations(trace, batch, plate_dim: int, client: str) -> None:
    """Refuse observed values a likelihood cannot score (one client's trace).

    A value outside the likelihood's support (a negative value into a Gamma, a count of
    2.5 into a Poisson), a bool or complex observation, or (where the support cannot be
    checked elementwise) a log-likelihood that cannot be evaluated raises
    :class:`~hbfl_pyro.data.DataValidationError` naming the client, the site (and data
    key) and the first offending index within the client's data. Entries the site masks
    out (``poutine.mask``) are not checked.
    """
    for name, site in _sample_sites(trace).items():
        if not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        value, fn = site["value"], site["fn"]
        if not isinstance(value, torch.Tensor) or isinstance(fn, Unit):
            continue  # (a pyro.factor site observes nothing: an empty value)
        key = _data_key(batch, value)
        where = f"client {client!r}, observed site {name!r}" + (
            f" (data key {key!r})" if key else ""
        )
        if value.dtype == torch.bool or value.is_complex():
            raise DataValidationError(
                f"{where}: the observations have dtype {value.dtype}; a likelihood scores "
                "real numbers: convert them before fitting (e.g. y.float() for 0/1 outcomes)"
            )
        mask = site["mask"] if isinstance(site.get("mask"), torch.Tensor) else None
        try:
            bad = ~fn.support.check(value)
        except Exception:  # a support that cannot be checked elementwise
            bad = None
        if bad is not None:
            if mask is not None:
                bad, mask_b = torch.broadcast_tensors(bad, mask.bool())
                bad = bad & mask_b
            if bool(bad.any()):
                first = tuple(int(j) for j in bad.nonzero()[0])
                full = first
                axis = len(first) + plate_dim
                if 0 <= axis < len(first):  # the clients axis: one client here
                    first = first[:axis] + first[axis + 1 :]
                try:
                    shown: object = value[full[-value.dim() :] if value.dim() else ()].tolist()
                except Exception:
                    shown = "?"
                base = fn
                while hasattr(base, "base_dist"):
                    base = base.base_dist
                raise DataValidationError(
                    f"{where}: {int(bad.sum())} value(s) outside the support of its "
                    f"{type(base).__name__} likelihood ({fn.support}); first at index "
                    f"{first} (value {shown}). Fix or drop those observations, or use a "
                    "likelihood whose support contains them"
                )
        if bad is not None:
            continue  # checked elementwise; scoring them all would cost a pass per client
        try:
            fn.log_prob(value)
        except Exception as exc:
            raise DataValidationError(
                f"{where}: the likelihood cannot score the observations "
                f"({type(exc).__name__}: {exc})"
            ) from exc


def _observed_log_prob(trace, observed) -> torch.Tensor:
    trace.compute_log_prob(site_filter=lambda name, site: name in observed)
    return sum(trace.nodes[name]["log_prob"].sum() for name in observed)


def _check_mask_is_used(model, data: FederatedData, observed) -> None:
    """Refuse a model whose likelihood scores ragged clients' padding rows.

    On the shortest client collated with the longest (so its rows are padded), the padded
    entries of every per-observation key are replaced by other real rows (the longest
    client's, then the short client's own last row) with every latent value held fixed;
    the observed sites' log-likelihood must not move. If it does, the padding is fitted
    as data, and a :class:`ModelStructureError` says how to mask it.
    """
    counts = [data.num_observations(i) for i in range(len(data))]
    if len(set(counts)) < 2:
        return
    short = min(range(len(data)), key=counts.__getitem__)
    long_ = max(range(len(data)), key=counts.__getitem__)
    batch = data.collate([short, long_])
    if MASK_KEY not in batch:
        return
    pad = ~batch[MASK_KEY][0]
    n_short = counts[short]
    keys = [
        k for k, t in data[short].items() if t.dim() > 0 and k not in data.per_client and k in batch
    ]
    alternatives = [lambda t: t[1, pad]]
    if n_short > 1:
        alternatives.append(lambda t: t[0, n_short - 1].expand_as(t[0, pad]))
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
        try:
            base = poutine.trace(model).get_trace(batch)
            ref = _observed_log_prob(base, observed).detach()
        except Exception:
            return  # the model's own failures are reported elsewhere
        for alternative in alternatives:
            perturbed = dict(batch)
            for key in keys:
                tensor = batch[key].clone()
                tensor[0, pad] = alternative(batch[key])
                perturbed[key] = tensor
            try:
                trace = poutine.trace(poutine.replay(model, trace=base)).get_trace(perturbed)
                moved = _observed_log_prob(trace, observed).detach()
            except Exception:
                continue
            if not torch.isclose(moved, ref, rtol=1e-6, atol=1e-6):
                raise ModelStructureError(
                    f"the model's likelihood depends on the padding of ragged clients: client "
                    f"{data.names[short]!r} has {n_short} observations, padded to "
                    f"{counts[long_]} with {data.names[long_]!r}, and changing only its padded "
                    f"rows changed the log-likelihood of {list(observed)} (from {float(ref):.6g} "
                    f"to {float(moved):.6g}), so the padding would be fitted as data. Wrap the "
                    "observation in poutine.mask(mask=data['mask']) (see "
                    "models/normal_normal.py): `with pyro.plate('obs', n, dim=-1), "
                    "poutine.mask(mask=data['mask']): pyro.sample(..., obs=data['y'])`"
                )
