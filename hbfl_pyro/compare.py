"""One call: a federated fit side by side with pooled Pyro SVI, pooled NUTS and a reference.

:func:`compare_pooled` takes a fitted :class:`~hbfl_pyro.FederatedSVI` and fits the *same
model* on the pooled data of all clients twice, with plain Pyro:

- **pooled SVI** with the *same guide family* as the federated fit (a fresh copy of its
  global factor's class and of its local factor's class, joined into one guide of the
  whole model; a structured local factor ``q_i(theta_i | phi)`` receives the global draws
  as in the federated fit), ``Trace_ELBO`` and ``ClippedAdam`` as
  :func:`~hbfl_pyro.pooled.fit_pooled_svi`;
- **NUTS** (:class:`pyro.infer.MCMC`, one chain, small budgets by default).

It returns a :class:`~hbfl_pyro.comparison.Comparison` (:mod:`hbfl_pyro.comparison`): one
row per scalar element of every global site, every local site per client, and every
per-client deterministic site, with the mean and sd of each method; ``z = (mean -
mean_ref) / sd_ref`` and ``sd / sd_ref`` against the reference (an external summary when
given, else the NUTS run); the federated-vs-pooled-SVI difference in pooled sd; the wall
times and the ELBOs (both estimated by Monte Carlo with the same number of particles). Its
``to_markdown``, ``to_csv`` and ``plot_forest`` (``arviz.plot_forest`` of all methods)
present it.

Only the summaries of an external reference are needed (mean and sd per parameter), in the
format of ``../shared/data/reference_posteriors/*.json``'s ``reference_summary``: see
:func:`reference_rows`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.poutine.util import site_is_subsample

from .client import recentre_local_guide
from .comparison import FEDERATED, NUTS_KEY, POOLED_SVI, REFERENCE, Comparison, Key
from .guides import build_global_guide, build_local_guide, is_autoguide_spec, private_params
from .guides.base import builds_itself, is_conditional
from .guides.joint import JointGuide
from .pooled import pooled_elbo, svi_steps
from .seeding import derive_seed, seeded
from .summary import deterministic_samples, drop_broadcast_dims, element_index


# ---------------------------------------------------------------------------- site layout
def site_layout(model, batch, structure) -> Dict[str, Tuple[bool, int]]:
    """``{site: (per_client, event_dim)}`` for the global, local and per-client deterministic
    sites of the model (per-observation deterministic sites are left out)."""
    with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False), private_params():
        trace = poutine.trace(model).get_trace(batch)
    nesting = structure.max_plate_nesting
    wanted = structure.global_sites + structure.local_sites + structure.deterministic_sites
    layout = {}
    for name in wanted:
        node = trace.nodes[name]
        if node["type"] != "sample" or site_is_subsample(node):
            continue
        plates = [f.name for f in node["cond_indep_stack"] if f.vectorized]
        if any(p != structure.plate for p in plates):
            continue  # per observation
        value, event_dim = node["value"], node["fn"].event_dim
        if name in structure.deterministic_sites and event_dim >= value.dim():
            # pyro.deterministic's default event_dim is value.ndim: take the batch dims back.
            event_dim = max(value.dim() - nesting, 0)
        layout[name] = (structure.plate in plates, event_dim)
    return layout


def pooled_draws(samples, layout, plate_dim: int) -> Dict[str, torch.Tensor]:
    """Draws ``{site: (n, *pooled value shape)}`` to ``(n, [clients,] *shape)``."""
    out = {}
    for site, (per_client, event_dim) in layout.items():
        if site not in samples:
            continue
        value = samples[site].detach()
        if per_client:
            axis = value.dim() - event_dim + plate_dim
            value = value.movedim(axis, 1)
            out[site] = drop_broadcast_dims(value, 2, event_dim)
        else:
            out[site] = drop_broadcast_dims(value, 1, event_dim)
    return out


def _federated_draws(fit, layout, num_samples: int, seed: int) -> Dict[str, torch.Tensor]:
    structure = fit.structure
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = fit.global_samples(num_samples)
        q = fit.local_samples(num_samples, global_draws=g)
        det_sites = [s for s in structure.deterministic_sites if s in layout]
        det = {}
        if det_sites:
            batches = {name: fit.clients[name].batch for name in fit.data.names}
            det = deterministic_samples(fit.model, batches, g, q, structure, sites=det_sites)
    out = {}
    for site, (per_client, event_dim) in layout.items():
        if site in g:
            out[site] = drop_broadcast_dims(g[site], 1, event_dim)
        elif site in q:
            out[site] = drop_broadcast_dims(q[site], 2, event_dim)
        elif site in det:
            per = det[site]
            if per_client:
                out[site] = torch.stack([per[c] for c in fit.data.names], 1)
            else:
                out[site] = per[""]
    return out


def element_moments(draws: Dict[str, torch.Tensor], per_client) -> Dict[Key, Tuple[float, float]]:
    out = {}
    for site, value in draws.items():
        value = value.to(torch.float64)
        if site in per_client:
            groups = [(c, value[:, i]) for i, c in enumerate(per_client[site])]
        else:
            groups = [("", value)]
        for client, v in groups:
            shape = tuple(v.shape[1:])
            flat = v.reshape(v.shape[0], -1)
            mean, sd = flat.mean(0), flat.std(0)
            for j in range(flat.shape[1]):
                out[site, client, element_index(j, shape)] = (float(mean[j]), float(sd[j]))
    return out


# ---------------------------------------------------------------------------- references
def reference_rows(summary, keys: Sequence[Key], clients: Sequence[str]) -> Dict[Key, Tuple]:
    """An external reference summary as ``{(site, client, index): (mean, sd)}``.

    :param summary: ``{name: {"mean": m, "sd": s}}`` (the ``reference_summary`` of the
        JSON files in ``../shared/data/reference_posteriors``), a path to such a JSON file,
        or a dict already keyed by ``(site, client, index)`` with ``(mean, sd)`` values.
        ``name`` is a site (``m`` a number, or a list with one entry per client, in the
        clients' order, or per element of a vector site) or ``site[j]`` (1-based, as
        posteriordb writes it: client ``j`` of a per-client site, else element ``j - 1``).
        Names that match no row are ignored (derived quantities such as ``log_tau``).
    :param keys: the table's row keys.
    :param clients: the client names in order.
    :returns: the reference's ``(mean, sd)`` for the rows it covers.

    Example::

        >>> keys = [("mu", "", ""), ("theta", "A", ""), ("theta", "B", "")]
        >>> ref = {"mu": {"mean": 4.4, "sd": 3.3}, "theta[2]": {"mean": 5.0, "sd": 6.0},
        ...        "log_tau": {"mean": 1.0, "sd": 1.0}}
        >>> reference_rows(ref, keys, ["A", "B"])
        {('mu', '', ''): (4.4, 3.3), ('theta', 'B', ''): (5.0, 6.0)}
    """
    if isinstance(summary, (str, os.PathLike)):
        loaded = json.loads(Path(summary).read_text())
        summary = loaded.get("reference_summary", loaded)
    keyset = set(keys)
    if all(isinstance(k, tuple) for k in summary):
        return {k: (float(v[0]), float(v[1])) for k, v in summary.items() if k in keyset}
    per_client_sites = {k[0] for k in keys if k[1]}
    out: Dict[Key, Tuple[float, float]] = {}
    for name, entry in summary.items():
        site, sep, rest = name.partition("[")
        if sep:
            j = int(rest.rstrip("]")) - 1
            if site in per_client_sites and 0 <= j < len(clients):
                candidates = [((site, clients[j], ""), entry["mean"], entry["sd"])]
            else:
                candidates = [((site, "", f"[{j}]"), entry["mean"], entry["sd"])]
        else:
            means = torch.as_tensor(entry["mean"], dtype=torch.float64)
            sds = torch.as_tensor(entry["sd"], dtype=torch.float64)
            if means.dim() == 0:
                candidates = [((site, "", ""), means, sds)]
            elif site in per_client_sites:
                means, sds = means.reshape(len(clients), -1), sds.reshape(len(clients), -1)
                shape = tuple(torch.as_tensor(entry["mean"]).shape[1:])
                candidates = [
                    ((site, c, element_index(e, shape)), means[i, e], sds[i, e])
                    for i, c in enumerate(clients)
                    for e in range(means.shape[1])
                ]
            else:
                shape = tuple(means.shape)
                candidates = [
                    ((site, "", element_index(e, shape)), m, s)
                    for e, (m, s) in enumerate(zip(means.reshape(-1), sds.reshape(-1)))
                ]
        for key, mean, sd in candidates:
            if key in keyset:
                out[key] = (float(mean), float(sd))
    return out


# ---------------------------------------------------------------------------- pooled fits
#: Pooled SVI recentres a structured local factor every this many steps: about as often,
#: per unit of optimisation, as a federated client does (once per round of a few steps).
RECENTRE_EVERY = 10


def _recentring(guide: JointGuide, structure, batch, seed: int):
    """The pooled counterpart of the clients' per-round recentring of a structured factor
    (``StructuredLocalNormal.recentre``), or ``None`` for a local guide without it."""
    if not is_conditional(guide.local_guide):
        return None

    def before_step(step: int) -> None:
        if step % RECENTRE_EVERY == 0:
            message = {"seed": derive_seed(seed, "pooled centre", step)}
            recentre_local_guide(guide.local_guide, guide.global_guide, structure, batch, message)

    return before_step


def _fresh_spec(guide, role: str, given=None):
    """The guide family of a fitted factor, to build an untrained copy of it: the class
    (or partial) the fit was given, else the fitted module's class."""
    if guide is None:
        return AutoNormal
    if is_autoguide_spec(given) or builds_itself(given):
        return given
    # FederatedSVI builds autoguides from their class (default rank, init scale): so here.
    if isinstance(guide, AutoGuide) or is_conditional(guide):
        return type(guide)
    raise TypeError(
        f"compare_pooled cannot rebuild the federated {role} guide "
        f"{type(guide).__name__} untrained; pass {role}_guide= (a class or a fresh "
        "module of the same family) to compare_pooled"
    )


def pooled_guide(fit, global_guide=None, local_guide=None) -> JointGuide:
    """A fresh, untrained pooled guide of the same family as a federated fit's factors.

    :param fit: a :class:`~hbfl_pyro.FederatedSVI`.
    :param global_guide: the global factor's family (default: the fit's; ``AutoNormal``
        for a closed-form fit, whose conjugate ``q(phi)`` is a Normal for ``NormalNormal``).
    :param local_guide: the local factor's family (default: the fit's).
    :returns: a :class:`JointGuide`.

    Example::

        >>> guide = pooled_guide(fit)  # doctest: +SKIP
    """
    structure, batch = fit.structure, fit.data.collate()
    template = next(iter(fit.clients.values())).local_guide
    specs = getattr(fit, "guide_specs", {})
    if global_guide is None:
        server_guide = fit.server.global_guide if fit.family is None else None
        global_guide = _fresh_spec(server_guide, "global", specs.get("global"))
    if local_guide is None:
        local_guide = _fresh_spec(template, "local", specs.get("local"))
    with private_params(), seeded(derive_seed(fit.seed, "pooled guide")):
        g = build_global_guide(fit.model, structure, fit.data.placeholder(), global_guide)
        q = build_local_guide(fit.model, structure, batch, local_guide)
        return JointGuide(g, q)


def predictive_draws(model, batch, sites, num_samples, seed, chunk=500, **kwargs):
    """Predictive draws of ``sites``, ``chunk`` draws at a time: Predictive also draws the
    observed sites, ``(draws, *data shape)``, which would not fit in memory all at once."""
    posterior = kwargs.pop("posterior_samples", None)
    parts = []
    with private_params(), seeded(seed), torch.no_grad():
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            given = dict(kwargs)
            if posterior is not None:
                given["posterior_samples"] = {k: v[start : start + n] for k, v in posterior.items()}
            else:
                given["num_samples"] = n
            try:
                parts.append(Predictive(model, return_sites=sites, parallel=True, **given)(batch))
            except Exception:  # a model that does not vectorise over draws: one at a time
                parts.append(Predictive(model, return_sites=sites, **given)(batch))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------- entry point
def _per_sd(value: float, sd: float) -> float:
    """``value / sd``; NaN where the reference does not vary (e.g. the fixed diagonal of a
    Cholesky factor of a correlation matrix), which the statistics then leave out."""
    return value / sd if sd > 0 else float("nan")


def compare_pooled(
    fit,
    *,
    svi: Optional[Mapping[str, Any]] = None,
    nuts: Optional[Mapping[str, Any]] = None,
    reference=None,
    num_samples: int = 2000,
    elbo_particles: int = 1000,
    global_guide=None,
    local_guide=None,
    seed: int = 0,
    progress: bool = True,
) -> Comparison:
    """Fit the federated fit's model pooled (Pyro SVI, same guide family, and NUTS) and
    return the side-by-side :class:`~hbfl_pyro.comparison.Comparison`.

    :param fit: a fitted :class:`~hbfl_pyro.FederatedSVI` (its model, clients, guide
        family and seed are used; the fit itself is not changed).
    :param svi: pooled SVI settings: ``steps`` (2000), ``lr`` (0.05), ``lr_decay`` (0.01:
        total decay over the run), ``num_particles`` (8); ``None`` uses these, ``False``
        skips pooled SVI.
    :param nuts: NUTS settings: ``warmup`` (300), ``samples`` (500), ``jit_compile``
        (False), ``target_accept_prob`` (0.8), ``max_tree_depth`` (10); ``None`` uses
        these, ``False`` skips NUTS.
    :param reference: an external reference summary (see :func:`reference_rows`): the
        ``z`` and sd ratios are against it; without one, against NUTS.
    :param num_samples: draws of each variational posterior behind its mean and sd.
    :param elbo_particles: Monte Carlo particles of both ELBO estimates.
    :param global_guide: the pooled global factor's family (default: the fit's).
    :param local_guide: the pooled local factor's family (default: the fit's).
    :param seed: seed of every random choice here.
    :param progress: progress bars (on stderr) for pooled SVI and NUTS.
    :returns: a :class:`~hbfl_pyro.comparison.Comparison`.
    :raises TypeError: if ``fit`` is not a :class:`~hbfl_pyro.FederatedSVI`.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from hbfl_pyro import FederatedSVI, num_clients
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("clients", num_clients(data)):
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])
        >>> clients = {f"site{i}": {"y": torch.tensor(float(i))} for i in range(3)}
        >>> fit = FederatedSVI(model, clients, seed=0, server="first_order")  # closed form
        >>> _ = fit.run(20, progress=False)
        >>> c = compare_pooled(fit, svi=dict(steps=100), nuts=dict(warmup=20, samples=20),
        ...                    num_samples=100, progress=False)
        >>> [r["client"] for r in c.rows]
        ['', 'site0', 'site1', 'site2']
        >>> c.reference, "fed_vs_pooled_z" in c.columns
        ('nuts', True)
    """
    from .svi import FederatedSVI

    if not isinstance(fit, FederatedSVI):
        raise TypeError(
            f"compare_pooled takes a fitted FederatedSVI, got {type(fit).__name__}; build one "
            "with FederatedSVI(model, clients, ...) and run it first"
        )
    svi_settings: Optional[Dict[str, Any]] = None if svi is False else {
        "steps": 2000, "lr": 0.05, "lr_decay": 0.01, "num_particles": 8, **(svi or {})
    }  # fmt: skip
    nuts_settings = None if nuts is False else {
        "warmup": 300, "samples": 500, "jit_compile": False, "target_accept_prob": 0.8,
        "max_tree_depth": 10, **(nuts or {}),
    }  # fmt: skip
    for name, given, allowed in (
        ("svi", svi_settings, ("steps", "lr", "lr_decay", "num_particles")),
        (
            "nuts",
            nuts_settings,
            ("warmup", "samples", "jit_compile", "target_accept_prob", "max_tree_depth"),
        ),
    ):
        unknown = sorted(set(given or ()) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} settings {unknown}; allowed: {list(allowed)}")

    model, structure, data = fit.model, fit.structure, fit.data
    batch = data.collate()
    clients = tuple(data.names)
    layout = site_layout(model, batch, structure)
    per_client = {s: clients for s, (pc, _) in layout.items() if pc}
    latent = [s for s in structure.global_sites + structure.local_sites]
    det = [s for s in structure.deterministic_sites if s in layout]

    draws: Dict[str, Dict[str, torch.Tensor]] = {}
    timings: Dict[str, float] = {FEDERATED: float(sum(r["seconds"] for r in fit.history))}
    elbo: Dict[str, float] = {}
    settings: Dict[str, Any] = {
        "federated rounds": fit.round,
        "posterior draws": num_samples,
        "ELBO particles": elbo_particles,
        "seed": seed,
    }
    diagnostics: Dict[str, Any] = {}
    if fit.server.mode == "second_order" and global_guide is None and local_guide is None:
        # Its family (a Gaussian q(z) with each client's Laplace factor) is no Pyro guide:
        # there is no "same family" to fit pooled; NUTS is the reference.
        if svi_settings is not None:
            settings["pooled SVI"] = "skipped: the second-order server's family has no pooled guide"
        svi_settings = None

    draws[FEDERATED] = _federated_draws(fit, layout, num_samples, derive_seed(seed, "fed"))
    with seeded(derive_seed(seed, "fed elbo")):
        elbo[FEDERATED] = float(fit.elbo(num_particles=elbo_particles))

    if svi_settings is not None:
        guide = pooled_guide(fit, global_guide, local_guide)
        start = time.perf_counter()
        svi_steps(
            model,
            guide,
            [p for m in (guide.global_guide, guide.local_guide) for p in m.parameters()],
            batch,
            steps=svi_settings["steps"],
            lr=svi_settings["lr"],
            lr_decay=svi_settings["lr_decay"],
            num_particles=svi_settings["num_particles"],
            seed=derive_seed(seed, "pooled svi"),
            progress=progress,
            before_step=_recentring(guide, structure, batch, seed),
        )
        timings[POOLED_SVI] = time.perf_counter() - start
        samples = predictive_draws(
            model, batch, latent + det, num_samples, derive_seed(seed, "svi draws"), guide=guide
        )
        draws[POOLED_SVI] = pooled_draws(samples, layout, structure.plate_dim)
        elbo[POOLED_SVI] = pooled_elbo(
            model, guide, data, elbo_particles, seed=derive_seed(seed, "pooled elbo")
        )
        settings.update({f"pooled SVI {k}": v for k, v in svi_settings.items()})
        settings["pooled guide"] = (
            f"{type(guide.global_guide).__name__} x {type(guide.local_guide).__name__}"
        )

    if nuts_settings is not None:
        kernel = NUTS(
            model,
            jit_compile=nuts_settings["jit_compile"],
            ignore_jit_warnings=True,
            target_accept_prob=nuts_settings["target_accept_prob"],
            max_tree_depth=nuts_settings["max_tree_depth"],
            max_plate_nesting=structure.max_plate_nesting,
        )
        mcmc = MCMC(
            kernel,
            num_samples=nuts_settings["samples"],
            warmup_steps=nuts_settings["warmup"],
            num_chains=1,
            disable_progbar=not progress,
        )
        start = time.perf_counter()
        with seeded(derive_seed(seed, "nuts")), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # jit tracer warnings
            mcmc.run(batch)
        timings[NUTS_KEY] = time.perf_counter() - start
        samples = dict(mcmc.get_samples())
        if det:
            samples.update(
                predictive_draws(
                    model,
                    batch,
                    det,
                    len(next(iter(samples.values()))),
                    derive_seed(seed, "nuts det"),
                    posterior_samples=samples,
                )
            )
        draws[NUTS_KEY] = pooled_draws(samples, layout, structure.plate_dim)
        diagnostics = _nuts_diagnostics(mcmc)
        settings.update({f"NUTS {k}": v for k, v in nuts_settings.items()})

    moments = {m: element_moments(d, per_client) for m, d in draws.items()}
    keys = list(moments[FEDERATED])
    methods = list(draws)
    ref_name = None
    if reference is not None:
        moments[REFERENCE] = reference_rows(reference, keys, clients)
        if not moments[REFERENCE]:
            raise ValueError(
                "the reference matches no parameter of the model; its names must be site "
                f"names ({sorted({k[0] for k in keys})}) or site[j] (1-based)"
            )
        methods.append(REFERENCE)
        ref_name = REFERENCE
    elif NUTS_KEY in draws:
        ref_name = NUTS_KEY

    nan = float("nan")
    rows = []
    for key in keys:
        row: Dict[str, Any] = {"site": key[0], "client": key[1], "index": key[2]}
        for m in methods:
            row[f"{m}_mean"], row[f"{m}_sd"] = moments[m].get(key, (nan, nan))
        if ref_name is not None:
            mean_ref, sd_ref = moments[ref_name].get(key, (nan, nan))
            for m in methods:
                if m != ref_name:
                    row[f"{m}_z"] = _per_sd(row[f"{m}_mean"] - mean_ref, sd_ref)
                    row[f"{m}_sd_ratio"] = _per_sd(row[f"{m}_sd"], sd_ref)
        if POOLED_SVI in methods:
            sd = row[f"{POOLED_SVI}_sd"]
            diff = row[f"{FEDERATED}_mean"] - row[f"{POOLED_SVI}_mean"]
            row["fed_vs_pooled_z"] = _per_sd(diff, sd)
            row["fed_vs_pooled_sd_ratio"] = _per_sd(row[f"{FEDERATED}_sd"], sd)
        rows.append(row)
    return Comparison(
        rows=rows,
        methods=tuple(methods),
        reference=ref_name,
        timings=timings,
        elbo=elbo,
        draws=draws,
        clients=clients,
        per_client=tuple(per_client),
        settings=settings,
        diagnostics=diagnostics,
    )


def _nuts_diagnostics(mcmc) -> Dict[str, Any]:
    diag = mcmc.diagnostics()
    ess, rhat = [], []
    divergences = 0
    for name, entry in diag.items():
        if name == "divergences":
            divergences = sum(len(v) for v in entry.values())
        elif isinstance(entry, dict) and "n_eff" in entry:
            ess.append(float(torch.as_tensor(entry["n_eff"]).min()))
            rhat.append(float(torch.as_tensor(entry["r_hat"]).max()))
    return {
        "divergences": divergences,
        "min_ess": min(ess) if ess else float("nan"),
        "max_rhat": max(rhat) if rhat else float("nan"),
    }


__all__ = ["Comparison", "JointGuide", "compare_pooled", "pooled_guide", "reference_rows"]
