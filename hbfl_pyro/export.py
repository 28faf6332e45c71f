"""Export a fitted :class:`~hbfl_pyro.FederatedSVI` to ArviZ (:class:`arviz.InferenceData`).

The groups follow ArviZ's schema, with named dims and coords (the client names):

- ``posterior``: draws of the global sites ``(chain, draw, ...)``, of the local sites
  ``(chain, draw, client, ...)``, and of the deterministic sites, recomputed on each client
  by :func:`hbfl_pyro.summary.deterministic_samples`. The draws are independent draws of
  the variational posterior ``q(phi) prod_i q_i(theta_i)`` (one chain, as for any VI fit),
  not an MCMC chain; they are the draws :func:`~hbfl_pyro.summary.posterior_summary`
  uses for the same ``seed`` and ``num_samples``.
- ``posterior_predictive``: replicated observations, drawn on each client from its own
  likelihood given the draws above.
- ``log_likelihood``: computed on each client, on its own data
  (:func:`~hbfl_pyro.client_export.evaluate_client`, :mod:`hbfl_pyro.client_export`).
  By default a client reports one number per draw, the **sum** over its observations
  of each observed site's log density: dims ``(chain, draw, client)``, so ``az.loo``
  leaves one *client* out. With ``pointwise=True`` it reports one value per observation
  (and the ``observed_data`` group is filled), so ``az.loo`` leaves one *observation*
  out. Per-observation values reveal more about a client's data than its sum; in a
  deployment each client decides whether to send them. Here, in simulation, one flag
  decides for all. With ``marginal_draws=K`` a client reports instead
  ``log p(D_i | phi)``, its local sites integrated out by importance sampling
  (:func:`~hbfl_pyro.client_export.client_marginal_log_likelihood`): the reliable basis
  for leave-one-client-out.
- ``elbo_history`` (a group outside ArviZ's schema, which ArviZ keeps and writes to
  netCDF): the server's ELBO estimate per round, with the number of clients heard and the
  round's wall time.

Sites inside a plate nested in the clients plate (typically the observation plate) are
*per-observation*: their values are flattened over the clients into one dim
``<site>_obs``, with a coordinate ``<site>_client`` naming each observation's client
(clients may hold different numbers of observations; observations the model masks out
with ``poutine.mask`` are left out). Other sites inside the clients
plate are *per-client*: dim ``client``. Size-1 dims that come only from plate
broadcasting are dropped, as in :mod:`hbfl_pyro.summary`.

The draws from ``q`` are an approximation of the posterior. PSIS-LOO on them
(``az.loo``) estimates the predictive accuracy of the fitted approximation, and its
Pareto ``k`` diagnoses also the fit of ``q`` (Yao et al., 2018, "Yes, but did it work?").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyro
import torch
from pyro import poutine

from .client_export import (
    client_marginal_log_likelihood,
    client_values,
    evaluate_client,
    inner_plates,
)
from .guides import private_params
from .seeding import derive_seed
from .structure import ModelStructure
from .summary import deterministic_samples, drop_broadcast_dims

CHAIN_DRAW = ("chain", "draw")
CLIENT_DIM = "client"
#: The log-likelihood variable of ``log p(D_i | phi)`` (all observed sites, locals integrated).
MARGINAL = "marginal"


def _obs_dim(site: str) -> str:
    return f"{site}_obs"


def _obs_client_coord(site: str) -> str:
    return f"{site}_client"


# ---------------------------------------------------------------------------- the dicts
@dataclass
class _Group:
    """One ArviZ group as plain arrays: ``data[var]`` with ``dims[var]`` (after chain, draw
    for sampled groups), and non-index coordinates ``extra_coords[name] = (dim, values)``."""

    data: Dict[str, np.ndarray] = field(default_factory=dict)
    dims: Dict[str, List[str]] = field(default_factory=dict)
    extra_coords: Dict[str, Tuple[str, np.ndarray]] = field(default_factory=dict)

    def add(self, var: str, array, dims: Sequence[str]) -> None:
        self.data[var] = np.asarray(array)
        self.dims[var] = list(dims)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _default_dims(site: str, shape) -> List[str]:
    return [f"{site}_dim_{k}" for k in range(len(shape))]


def _chains(array: np.ndarray) -> np.ndarray:
    """``(draws, ...)`` -> ``(1, draws, ...)``: independent draws from ``q`` as one chain."""
    return array[None]


def _add_flattened(
    group: _Group, site: str, per_client: Sequence[np.ndarray], clients: Sequence[str], lead: int
) -> None:
    """Concatenate per-client arrays along their observation axis (axis ``lead``)."""
    array = np.concatenate(per_client, axis=lead)
    counts = [a.shape[lead] for a in per_client]
    labels = np.repeat(np.asarray(clients, dtype=object), counts).astype(str)
    rest = array.shape[lead + 1 :]
    dims = [_obs_dim(site)] + _default_dims(site, rest)
    group.add(site, _chains(array) if lead else array, dims)
    group.extra_coords[_obs_client_coord(site)] = (_obs_dim(site), labels)


def _add_per_client(
    group: _Group, site: str, per_client: Sequence[np.ndarray], sampled: bool = True
) -> None:
    """Stack per-client arrays ``(n, *shape)`` (or ``(*shape)``) along a client axis."""
    axis = 1 if sampled else 0
    array = np.stack(per_client, axis=axis)
    rest = array.shape[axis + 1 :]
    group.add(site, _chains(array) if sampled else array, [CLIENT_DIM] + _default_dims(site, rest))


@dataclass
class _Export:
    """Everything :func:`to_inference_data` needs, as numpy arrays and names (no ArviZ)."""

    groups: Dict[str, _Group]
    coords: Dict[str, List[str]]
    attrs: Dict[str, Any]
    elbo_history: Dict[str, np.ndarray]


def _build(fit, num_samples: int, seed: int, pointwise: bool, marginal_draws: int) -> _Export:
    structure: ModelStructure = fit.structure
    names = list(fit.data.names)
    event_dims = dict(structure.event_dims)
    batches = {name: fit.clients[name].batch for name in names}
    # The same draws as posterior_summary(fit, num_samples, seed), so the exported
    # posterior and summary.csv agree exactly.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        global_draws = fit.global_samples(num_samples)
        local_draws = fit.local_samples(num_samples, global_draws=global_draws)
        det = {}
        if structure.deterministic_sites:
            det = deterministic_samples(fit.model, batches, global_draws, local_draws, structure)

    # Each client evaluates its own data; the server only collects the results.
    evaluations = {
        name: evaluate_client(
            fit.model,
            structure,
            batches[name],
            global_draws,
            {s: v[:, i] for s, v in local_draws.items()},
            seed=derive_seed(seed, "posterior_predictive", name),
            pointwise=pointwise,
        )
        for i, name in enumerate(names)
    }

    posterior = _Group()
    for site in structure.global_sites:
        draws = _np(drop_broadcast_dims(global_draws[site], 1, event_dims.get(site, 0)))
        posterior.add(site, _chains(draws), _default_dims(site, draws.shape[1:]))
    for site in structure.local_sites:
        draws = _np(drop_broadcast_dims(local_draws[site], 2, event_dims.get(site, 0)))
        posterior.add(site, _chains(draws), [CLIENT_DIM] + _default_dims(site, draws.shape[2:]))
    inside = _deterministic_layout(fit, batches[names[0]], global_draws, local_draws)
    for site, per_client in det.items():
        if "" in per_client:  # a function of the global sites only
            draws = _np(per_client[""])
            posterior.add(site, _chains(draws), _default_dims(site, draws.shape[1:]))
            continue
        arrays = [_np(per_client[name]) for name in names]
        same = len({a.shape for a in arrays}) == 1
        if inside.get(site, False) or not same:
            flat = [a.reshape(a.shape[0], -1) for a in arrays]
            _add_flattened(posterior, site, flat, names, lead=1)
        else:
            _add_per_client(posterior, site, arrays)

    predictive, log_lik, observed = _Group(), _Group(), _Group()
    for site in structure.observed_sites:
        per_obs = evaluations[names[0]]["per_observation"][site]
        ll = [_np(evaluations[n]["log_likelihood"][site]) for n in names]
        # A pyro.factor site has a log-likelihood but no data to replicate or show.
        replicable = site in evaluations[names[0]]["posterior_predictive"]
        if replicable:
            pp = [_np(evaluations[n]["posterior_predictive"][site]) for n in names]
            # Per-client values of different shapes (an event of each client's own length)
            # are flattened like per-observation ones.
            ragged = len({a.shape for a in pp}) > 1
            if per_obs or ragged:
                _add_flattened(
                    predictive, site, [a.reshape(a.shape[0], -1) for a in pp], names, lead=1
                )
            else:
                _add_per_client(predictive, site, pp)
        if per_obs and pointwise:
            _add_flattened(log_lik, site, ll, names, lead=1)
        elif not marginal_draws:  # else one marginal variable replaces the sites (below)
            _add_per_client(log_lik, site, ll)
        if pointwise and replicable:
            obs = [_np(evaluations[n]["observed"][site]) for n in names]
            if per_obs or ragged:
                obs = [a.reshape(-1) for a in obs]
                _add_flattened(observed, site, obs, names, lead=0)
            else:
                _add_per_client(observed, site, obs, sampled=False)

    if marginal_draws:
        marginal = [
            _np(
                client_marginal_log_likelihood(
                    fit.model,
                    structure,
                    batches[name],
                    global_draws,
                    fit.clients[name].local_guide,
                    marginal_draws,
                    seed=derive_seed(seed, "marginal", name),
                )
            )
            for name in names
        ]
        _add_per_client(log_lik, MARGINAL, marginal)

    groups = {"posterior": posterior, "posterior_predictive": predictive, "log_likelihood": log_lik}
    if pointwise:
        groups["observed_data"] = observed
    history = fit.history
    elbo_history = {}
    if history:
        elbo_history = {
            "round": np.array([r["round"] for r in history], dtype=np.int64),
            "elbo": np.array([r["elbo"] for r in history], dtype=np.float64),
            "num_clients": np.array([len(r["clients"]) for r in history], dtype=np.int64),
            "num_failed": np.array([len(r.get("failed", ())) for r in history], dtype=np.int64),
            "updated": np.array([bool(r.get("updated", True)) for r in history]),
            "seconds": np.array([r.get("seconds", np.nan) for r in history], dtype=np.float64),
        }
    from . import __version__
    from .verdict import verdict_lines

    verdict = fit.verdict
    what_draws = (
        "PSIS-resampled draws of the globals' posterior (the second-order server's corrected "
        "q(z)), each client's locals resampled from importance draws at each"
        if fit.server.mode == "second_order"
        else "independent draws of the variational posterior q(phi) prod_i q_i(theta_i)"
    )
    attrs = {
        "inference_library": "hbfl_pyro",
        "inference_library_version": __version__,
        "pyro_version": str(pyro.__version__),
        "torch_version": str(torch.__version__),  # a str subclass h5py rejects
        "inference_method": "federated SVI (FedHB)",
        "draws": what_draws,
        "server_mode": fit.server.mode,
        # How the fit ended, as the CLI and report.md say it (issue 13): status and k-hat.
        "verdict": verdict_lines(verdict)[0],
        "verdict_status": str(verdict.get("status")),
        "rounds": int(fit.round),
        "fit_seed": int(fit.seed),
        "draws_seed": int(seed),
        "log_likelihood": (
            "pointwise"
            if pointwise
            else f"per_client_marginal ({marginal_draws} importance draws)"
            if marginal_draws
            else "per_client_sum"
        ),
    }
    if verdict.get("k_hat") is not None:
        attrs["verdict_k_hat"] = float(verdict["k_hat"])
        attrs["verdict_reliable"] = int(bool(verdict.get("reliable")))  # netCDF: no bools
    return _Export(groups, {CLIENT_DIM: names}, attrs, elbo_history)


def _deterministic_layout(fit, batch, global_draws, local_draws) -> Dict[str, bool]:
    """``{site: True}`` for deterministic sites inside a plate nested in the clients plate."""
    structure = fit.structure
    if not structure.deterministic_sites:
        return {}
    first = {s: v[:1] for s, v in global_draws.items()}
    own = {s: v[:1, 0] for s, v in local_draws.items()}
    values = client_values(first, own, structure, plain=True)  # plain Pyro shapes
    with private_params(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(fit.model, data=values)).get_trace(batch)
    return {
        site: bool(inner_plates(trace.nodes[site], structure))
        for site in structure.deterministic_sites
    }


# ---------------------------------------------------------------------------- to ArviZ
def _to_inference_data(export: _Export):
    """The ArviZ 0.x converter: ``az.from_dict`` plus ``add_groups``.

    Each group has its own ``dims`` (``y`` is per observation in ``posterior_predictive``
    but per client in the default ``log_likelihood``), so groups beyond the posterior are
    added one by one. For ArviZ 1.x (``xarray.DataTree``) only this function changes:
    build each group's dataset the same way (``dict_to_dataset`` of the group's
    ``data``, ``dims`` and the shared ``coords``, then its ``extra_coords``) and assemble
    them with ``xarray.DataTree.from_dict({"/posterior": ..., ...})``. Meanwhile
    ``idata.to_datatree()`` converts the result.
    """
    import arviz as az
    import xarray as xr

    posterior = export.groups["posterior"]
    idata = az.from_dict(
        posterior=posterior.data,
        dims=posterior.dims,
        coords=export.coords,
        attrs=dict(export.attrs),
        posterior_attrs=dict(export.attrs),
    )
    for name, group in export.groups.items():
        if name == "posterior" or not group.data:
            continue
        if name == "observed_data":
            dataset = az.dict_to_dataset(
                group.data, coords=export.coords, dims=group.dims, default_dims=[]
            )
        else:
            dataset = az.dict_to_dataset(group.data, coords=export.coords, dims=group.dims)
        dataset.attrs.update(export.attrs)
        idata.add_groups({name: dataset})
    for name, group in export.groups.items():
        if name not in idata.groups():
            continue
        dataset = idata[name]
        extra = {
            coord: (dim, values)
            for coord, (dim, values) in group.extra_coords.items()
            if dim in dataset.dims
        }
        if extra:
            setattr(idata, name, dataset.assign_coords(extra))
    if export.elbo_history:
        history = dict(export.elbo_history)
        rounds = history.pop("round")
        dataset = xr.Dataset(
            {key: ("round", value) for key, value in history.items()},
            coords={"round": rounds},
            attrs={"description": "the server's ELBO estimate after each federated round"},
        )
        idata.add_groups({"elbo_history": dataset})
    return idata


def to_inference_data(
    fit,
    num_samples: int = 1000,
    seed: int = 0,
    pointwise: bool = False,
    marginal_draws: int = 0,
):
    """An :class:`arviz.InferenceData` of a fitted model (see the module docstring).

    :param fit: a :class:`~hbfl_pyro.FederatedSVI` (fitted or not).
    :param num_samples: draws of ``q``.
    :param seed: seed of the draws (the caller's random state is left untouched); the
        posterior draws equal those of ``posterior_summary(fit, num_samples, seed)``.
    :param pointwise: log-likelihood per observation and an ``observed_data`` group
        (a client's opt-in in a deployment); else one sum per client and draw.
    :param marginal_draws: if ``K > 0``, the ``log_likelihood`` group holds instead one
        variable ``"marginal"``, ``log p(D_i | phi)`` per client and draw with the local
        sites integrated out by ``K`` importance draws from each ``q_i``
        (:func:`~hbfl_pyro.client_export.client_marginal_log_likelihood`): the better basis for
        leave-one-client-out, whose conditional version ``log p(D_i | theta_i, phi)``
        often has Pareto ``k > 0.7`` because ``theta_i`` is learned from ``D_i`` itself.
    :returns: an ``InferenceData`` with groups ``posterior``, ``posterior_predictive``,
        ``log_likelihood``, ``elbo_history`` (when the fit has run rounds) and, with
        ``pointwise``, ``observed_data``. ``az.summary``, ``az.plot_forest``,
        ``az.loo`` (leave one client out, by default) and ``to_netcdf`` work on it.

    Example::

        >>> import arviz as az, torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(4)}
        >>> fit = FederatedSVI(model, clients, seed=0)
        >>> _ = fit.run(3, progress=False)
        >>> idata = to_inference_data(fit, num_samples=200)
        >>> idata.posterior["theta"].dims
        ('chain', 'draw', 'client')
        >>> idata.log_likelihood["y"].sizes["client"]
        4
        >>> bool(az.loo(idata).elpd_loo < 0)  # leave one client out
        True
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if marginal_draws < 0 or (marginal_draws and pointwise):
        raise ValueError(
            "marginal_draws must be >= 0, and 0 with pointwise=True (the marginal "
            f"likelihood is one value per client), got {marginal_draws}"
        )
    return _to_inference_data(_build(fit, num_samples, seed, pointwise, marginal_draws))


# ---------------------------------------------------------------------------- comparison
def client_log_likelihood(idata, var_name: Optional[str] = None):
    """The log-likelihood of each client's data per draw, ``(chain, draw, client)``.

    Sums the observed sites (or only ``var_name``) and, for pointwise values, each
    client's observations (grouped by the ``<site>_client`` coordinate). This is what
    leave-one-client-out needs, from either kind of export.

    :returns: an :class:`xarray.DataArray` named ``"client_log_likelihood"``.

    Example::

        >>> ll = client_log_likelihood(idata)  # doctest: +SKIP
        >>> ll.dims  # doctest: +SKIP
        ('chain', 'draw', 'client')
    """
    group = idata.log_likelihood
    names = [var_name] if var_name is not None else list(group.data_vars)
    clients = list(idata.posterior[CLIENT_DIM].values) if CLIENT_DIM in idata.posterior.dims else []
    total = None
    for name in names:
        da = group[name]
        obs = _obs_dim(name)
        if obs in da.dims:
            da = da.groupby(_obs_client_coord(name)).sum(obs)
            da = da.rename({_obs_client_coord(name): CLIENT_DIM})
        if CLIENT_DIM not in da.dims:
            raise ValueError(
                f"log-likelihood variable {name!r} has dims {da.dims}: neither per client nor "
                "per observation; export it with hbfl_pyro.export.to_inference_data"
            )
        extra = [d for d in da.dims if d not in CHAIN_DRAW + (CLIENT_DIM,)]
        da = da.sum(extra) if extra else da
        if clients:
            da = da.sel({CLIENT_DIM: clients})
        total = da if total is None else total + da
    if total is None:
        raise ValueError("the log_likelihood group has no variable to sum per client")
    return total.transpose(*CHAIN_DRAW, CLIENT_DIM).rename("client_log_likelihood")


def client_loo_data(idata, var_name: Optional[str]):
    import arviz as az

    ll = client_log_likelihood(idata, var_name)
    return az.InferenceData(posterior=idata.posterior, log_likelihood=ll.to_dataset())


def compare_clients_loo(
    idata_a, idata_b, names: Tuple[str, str] = ("a", "b"), var_name: Optional[str] = None
):
    """Compare two models by leave-one-client-out PSIS-LOO (``az.compare``).

    Each client is one "observation": its whole data set's log-likelihood per draw
    (:func:`client_log_likelihood`), so the comparison estimates how well each model
    predicts the data of a client it was not fitted to, within the PSIS approximation
    (check the ``warning`` column: Pareto ``k`` above 0.7 flags clients whose removal
    moves the posterior too much for importance sampling; with few clients this is
    common, and then refitting without the client is the reliable check).

    :param idata_a: an export of model a (:func:`to_inference_data`).
    :param idata_b: an export of model b, of the same clients.
    :param names: the models' labels in the table.
    :param var_name: one observed site (default: all, summed).
    :returns: ``az.compare``'s table (a pandas DataFrame), best model first:
        ``elpd_loo``, ``p_loo``, ``elpd_diff`` (to the best), ``se``, ``dse`` (the
        standard error of the difference, from the clients' paired differences),
        ``weight``, ``warning``.
    :raises ValueError: when the two exports do not hold the same clients.

    Example::

        >>> table = compare_clients_loo(to_inference_data(fit_a), to_inference_data(fit_b),
        ...                             names=("centered", "noncentered"))  # doctest: +SKIP
        >>> table[["elpd_loo", "elpd_diff", "dse"]]  # doctest: +SKIP
    """
    import arviz as az

    clients_a = [str(c) for c in idata_a.posterior[CLIENT_DIM].values]
    clients_b = [str(c) for c in idata_b.posterior[CLIENT_DIM].values]
    if sorted(clients_a) != sorted(clients_b):
        raise ValueError(
            "the two exports hold different clients (only in a: "
            f"{sorted(set(clients_a) - set(clients_b))}, only in b: "
            f"{sorted(set(clients_b) - set(clients_a))}); leave-one-client-out compares "
            "models fitted to the same clients"
        )
    a = client_loo_data(idata_a, var_name)
    b = client_loo_data(idata_b, var_name)
    # Same client order in both, so az.compare pairs each client's elpd correctly.
    b.log_likelihood = b.log_likelihood.sel({CLIENT_DIM: clients_a})
    with warnings.catch_warnings():
        # Few clients: az.compare repeats loo's Pareto-k warning; the table's
        # `warning` column carries it.
        warnings.filterwarnings("ignore", message=".*Pareto.*", category=UserWarning)
        # ArviZ 0.23 calls a pandas method pandas 3.1 deprecates; nothing for a user to do.
        warnings.filterwarnings("ignore", message=".*inplace keyword.*")
        return az.compare({names[0]: a, names[1]: b}, ic="loo")


__all__ = [
    "client_log_likelihood",
    "client_marginal_log_likelihood",
    "compare_clients_loo",
    "evaluate_client",
    "to_inference_data",
]
