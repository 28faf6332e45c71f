"""A run's report files: the ArviZ export, two figures, and a markdown report.

:func:`write_report` writes, into one folder:

- ``posterior.nc``: the :class:`arviz.InferenceData` of :func:`hbfl_pyro.export.to_inference_data`
  (netCDF through h5netcdf; open it with ``arviz.from_netcdf``);
- ``forest.png``: ``arviz.plot_forest`` of the global sites, the local sites per client
  and the deterministic sites that are global or per client (90% HDI and quartiles);
- ``elbo.png``: the server's ELBO estimate per round, whole run and its second half;
- ``report.md``: settings, seeds, library versions, timings, the posterior summary table
  (the rows of ``summary.csv``), a leave-one-client-out PSIS-LOO estimate and, given a
  :class:`~hbfl_pyro.comparison.Comparison`, the side-by-side table of the federated fit,
  pooled SVI, NUTS and a reference (``comparison.csv`` and ``comparison.png`` are written
  by its own methods).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so writing a report
neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .summary import COLUMNS, format_number
from .verdict import verdict_lines

#: Distributions whose versions the report records (name on PyPI).
LIBRARIES = ("hbfl_pyro", "torch", "pyro-ppl", "numpy", "arviz", "xarray", "h5netcdf", "matplotlib")
#: At most this many clients' local sites are drawn in the forest plot.
MAX_FOREST_CLIENTS = 40


def library_versions() -> Dict[str, str]:
    """``{distribution: version}`` of Python and the libraries a run depends on.

    Example::

        >>> "torch" in library_versions()
        True
    """
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------- netCDF
def write_netcdf(idata, path) -> Optional[Path]:
    """Write ``idata`` to netCDF-4 with the first engine installed (h5netcdf, netCDF4).

    :returns: the path, or ``None`` (with a warning) when neither engine is installed.

    Example::

        >>> write_netcdf(to_inference_data(fit), "runs/demo/posterior.nc")  # doctest: +SKIP
    """
    path = Path(path)
    for module, engine in (("h5netcdf", "h5netcdf"), ("netCDF4", "netcdf4")):
        if importlib.util.find_spec(module) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            idata.to_netcdf(str(path), engine=engine)
            return path
    warnings.warn(
        f"{path} not written: writing netCDF needs h5netcdf or netCDF4 (pip install h5netcdf)",
        stacklevel=2,
    )
    return None


# ---------------------------------------------------------------------------- figures
def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def forest_var_names(idata) -> List[str]:
    """The posterior variables worth a forest plot: all but per-observation ones."""
    posterior = idata.posterior
    return [v for v in posterior.data_vars if f"{v}_obs" not in posterior[v].dims]


def plot_forest(idata, path, var_names: Optional[Sequence[str]] = None) -> Path:
    """``arviz.plot_forest`` of the posterior, written as a PNG.

    :param idata: an export of :func:`~hbfl_pyro.export.to_inference_data`.
    :param path: the PNG to write.
    :param var_names: the variables (default: :func:`forest_var_names`). Local sites are
        drawn for the first :data:`MAX_FOREST_CLIENTS` clients.
    :returns: the path written.
    """
    import arviz as az

    posterior = idata.posterior
    var_names = list(forest_var_names(idata) if var_names is None else var_names)
    coords, title = {}, "posterior (draws of q): 90% HDI, quartiles, median"
    if "client" in posterior.dims and posterior.sizes["client"] > MAX_FOREST_CLIENTS:
        coords["client"] = list(posterior["client"].values[:MAX_FOREST_CLIENTS])
        title += f"; first {MAX_FOREST_CLIENTS} of {posterior.sizes['client']} clients"
    rows = 0
    for var in var_names:
        sizes = posterior[var].sizes
        shape = [sizes[d] if d not in coords else len(coords[d]) for d in sizes]
        rows += math.prod(shape[2:])  # after chain, draw
    fig = new_figure(7.0, min(max(2.5, 0.28 * rows + 1.2), 60.0))
    ax = fig.add_subplot()
    az.plot_forest(
        idata,
        var_names=var_names,
        coords=coords or None,
        combined=True,
        hdi_prob=0.9,
        ax=ax,
        show=False,
    )
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_elbo(history: Sequence[Mapping], path) -> Path:
    """The server's ELBO estimate per round (``fit.history``), written as a PNG.

    Two panels: the whole run, and its second half on its own scale (early rounds are
    often orders of magnitude lower and would flatten the end of the run). Rounds
    without a server update (too few clients answered) have no value and are skipped.

    :returns: the path written.
    """
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in history if math.isfinite(r.get("elbo", float("nan")))]
    elbo = [r["elbo"] for r in history if math.isfinite(r.get("elbo", float("nan")))]
    fig = new_figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    if not rounds:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no rounds run", ha="center", va="center", transform=ax.transAxes)
    else:
        left.plot(rounds, elbo, lw=1.2, color="C0", marker="." if len(rounds) < 30 else "")
        left.set_title("ELBO estimate, all rounds", fontsize=10)
        half = len(rounds) // 2
        marker = "." if len(rounds) - half < 30 else ""
        right.plot(rounds[half:], elbo[half:], lw=1.2, color="C0", marker=marker)
        right.set_title(f"rounds {rounds[half]}-{rounds[-1]}", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
    left.set_ylabel("ELBO (nats)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------- markdown
def markdown_table(rows: Sequence[Mapping]) -> str:
    """Summary rows (:func:`~hbfl_pyro.summary.posterior_summary`) as a markdown table.

    Example::

        >>> print(markdown_table([{"site": "mu", "client": "", "index": "", "mean": 4.3789,
        ...                        "sd": 0.61, "q5": 3.4, "q95": 5.41}]))
        | site | client | index | mean | sd | q5 | q95 |
        |---|---|---|---:|---:|---:|---:|
        | mu |  |  | 4.38 | 0.610 | 3.40 | 5.41 |
    """
    numeric = ("mean", "sd", "q5", "q95")
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in numeric else "---" for c in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [format_number(row[c]) if c in numeric else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key_value_table(pairs: Sequence[Tuple[str, Any]], head=("setting", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in pairs]
    return "\n".join(lines)


def _loo_line(idata) -> str:
    """Leave-one-client-out PSIS-LOO of the export, as one markdown paragraph."""
    import arviz as az

    from .export import client_loo_data

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(client_loo_data(idata, None), pointwise=True)
    except Exception as exc:  # a report must not fail on a diagnostic
        return f"Leave-one-client-out PSIS-LOO could not be computed: {exc}"
    from .export import MARGINAL

    k = loo.pareto_k.values
    bad = int((k > loo.good_k).sum())
    marginal = MARGINAL in idata.log_likelihood.data_vars
    kind = (
        "log p(data | globals), local sites integrated out"
        if marginal
        else "log p(data | locals, globals)"
    )
    text = (
        f"Leave-one-client-out PSIS-LOO (`az.loo` on each client's {kind}): "
        f"elpd_loo = {loo.elpd_loo:.2f} (se {loo.se:.2f}), p_loo = {loo.p_loo:.2f}, "
        f"max Pareto k = {k.max():.2f}; {bad} of {len(k)} clients have k > {loo.good_k:.2f}, "
        "where the importance-sampling estimate is unreliable."
    )
    if bad and not marginal:
        text += (
            " With the local sites held at a client's own posterior, leaving the client out "
            "moves them a lot; rerun with `--marginal-draws 100` (integrating them out) "
            "for a reliable leave-one-client-out estimate."
        )
    return text


def report_markdown(
    fit,
    rows: Sequence[Mapping],
    settings: Sequence[Tuple[str, Any]],
    timings: Mapping[str, float],
    files: Sequence[str],
    idata=None,
    comparison=None,
) -> str:
    """The text of ``report.md``.

    :param fit: the fitted :class:`~hbfl_pyro.FederatedSVI`.
    :param rows: the posterior summary rows.
    :param settings: ``(name, value)`` pairs: the run's settings and seeds.
    :param timings: ``{step: seconds}``.
    :param files: names of the files written next to the report.
    :param idata: the export, for the leave-one-client-out line (optional).
    :param comparison: a :class:`~hbfl_pyro.comparison.Comparison` (optional): its settings
        and table (first 20 clients' local rows; all rows in ``comparison.csv``).
    """
    history = fit.history
    lines = ["# hbfl_pyro run report", ""]
    lines += ["## Settings", "", _key_value_table(settings), ""]
    if history:
        final = history[-1]
        lines += [
            "## Fit",
            "",
            f"{fit.round} rounds; final ELBO estimate (round {final['round']}): "
            f"{final['elbo']:.6g}. Mean clients per round: "
            f"{sum(len(r['clients']) for r in history) / len(history):.3g}; "
            f"rounds without a server update: {sum(not r.get('updated', True) for r in history)}.",
            "",
        ]
    verdict_line, banner = verdict_lines(fit.verdict)
    lines += [f"**Verdict:** {verdict_line}.", ""]
    if banner is not None:
        lines += ["```", *banner, "```", ""]
    lines += ["## Posterior summary", ""]
    lines += [
        "Mean, sd and 5%/95% quantiles of each scalar element of every site, from draws of "
        "the variational posterior (the rows of `summary.csv`). Local sites: one row per "
        "client.",
        "",
        markdown_table(rows),
        "",
    ]
    if idata is not None:
        lines += ["## Model checking", "", _loo_line(idata), ""]
    if comparison is not None:
        lines += [
            "## Comparison with pooled fits",
            "",
            "The same model fitted on the pooled data of all clients with plain Pyro: SVI "
            "with the same guide family and NUTS (small budgets; see the settings below). "
            "Means and sds from draws of each method; the federated-minus-pooled column is "
            "in units of the pooled-VI sd.",
            "",
            _key_value_table(list(comparison.settings.items())),
            "",
            comparison.to_markdown(max_clients=20),
        ]
    lines += [
        "## Timings",
        "",
        _key_value_table(
            [(k, f"{v:.2f} s") for k, v in timings.items()], head=("step", "wall time")
        ),
        "",
    ]
    lines += [
        "## Library versions",
        "",
        _key_value_table(list(library_versions().items()), head=("library", "version")),
        "",
    ]
    lines += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    return "\n".join(lines)


def write_report(
    fit,
    out_dir,
    rows: Sequence[Mapping],
    idata=None,
    settings: Sequence[Tuple[str, Any]] = (),
    timings: Optional[Mapping[str, float]] = None,
    num_samples: int = 2000,
    seed: int = 0,
    pointwise: bool = False,
    comparison=None,
) -> Dict[str, Path]:
    """Write ``posterior.nc``, ``forest.png``, ``elbo.png`` and ``report.md`` to ``out_dir``.

    :param fit: the fitted :class:`~hbfl_pyro.FederatedSVI`.
    :param out_dir: the folder (created if missing).
    :param rows: the posterior summary rows (:func:`~hbfl_pyro.summary.posterior_summary`).
    :param idata: the export; made here with ``num_samples``, ``seed`` and ``pointwise``
        when not given.
    :param settings: ``(name, value)`` pairs for the report's settings table.
    :param timings: ``{step: seconds}`` measured by the caller; this function adds its own.
    :param comparison: a :class:`~hbfl_pyro.comparison.Comparison` whose table goes into
        ``report.md``; the names of ``comparison.csv`` and ``comparison.png`` are listed
        when they exist in ``out_dir``.
    :returns: ``{"posterior": path, "forest": path, "elbo": path, "report": path}``
        (``posterior`` absent when no netCDF engine is installed).

    Example::

        >>> rows = posterior_summary(fit, num_samples=2000, seed=0)  # doctest: +SKIP
        >>> write_report(fit, "runs/demo", rows)  # doctest: +SKIP
        {'posterior': PosixPath('runs/demo/posterior.nc'), ...}
    """
    from .export import to_inference_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = dict(timings or {})
    if idata is None:
        start = time.perf_counter()
        idata = to_inference_data(fit, num_samples=num_samples, seed=seed, pointwise=pointwise)
        timings["ArviZ export"] = time.perf_counter() - start
    paths: Dict[str, Path] = {}
    start = time.perf_counter()
    written = write_netcdf(idata, out_dir / "posterior.nc")
    if written is not None:
        paths["posterior"] = written
    timings["posterior.nc"] = time.perf_counter() - start
    start = time.perf_counter()
    paths["forest"] = plot_forest(idata, out_dir / "forest.png")
    paths["elbo"] = plot_elbo(fit.history, out_dir / "elbo.png")
    timings["figures"] = time.perf_counter() - start
    files = [p.name for p in paths.values()]
    if (out_dir / "summary.csv").exists():
        files.insert(0, "summary.csv")
    if comparison is not None:
        files += [n for n in ("comparison.csv", "comparison.png") if (out_dir / n).exists()]
    text = report_markdown(
        fit, rows, settings, timings, files + ["report.md"], idata, comparison=comparison
    )
    paths["report"] = out_dir / "report.md"
    paths["report"].write_text(text)
    return paths


__all__ = [
    "library_versions",
    "markdown_table",
    "plot_elbo",
    "plot_forest",
    "report_markdown",
    "write_netcdf",
    "write_report",
]
