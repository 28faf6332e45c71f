"""The result of :func:`~hbfl_pyro.compare.compare_pooled`: the side-by-side table and its views.

A :class:`Comparison` holds one row per scalar parameter with each method's mean and sd,
``z`` and sd ratios against the reference, and the federated-vs-pooled-VI difference, and
presents them: :meth:`Comparison.stats`, :meth:`Comparison.to_markdown`,
:meth:`Comparison.to_csv`, :meth:`Comparison.to_inference_data` and
:meth:`Comparison.plot_forest`. :mod:`hbfl_pyro.compare` runs the fits that fill it.

Example::

    >>> c = Comparison(
    ...     rows=[{"site": "mu", "client": "", "index": "", "federated_mean": 1.0,
    ...            "federated_sd": 0.5, "nuts_mean": 1.1, "nuts_sd": 0.5,
    ...            "federated_z": -0.2, "federated_sd_ratio": 1.0}],
    ...     methods=("federated", "nuts"),
    ...     reference="nuts",
    ... )
    >>> c.stats()["federated global"]["max_abs_z"]
    0.2
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

#: Method keys, in table order.
FEDERATED, POOLED_SVI, NUTS_KEY, REFERENCE = "federated", "pooled_svi", "nuts", "reference"
LABELS = {
    FEDERATED: "federated VI",
    POOLED_SVI: "pooled VI",
    NUTS_KEY: "NUTS",
    REFERENCE: "reference",
}
Key = Tuple[str, str, str]  # (site, client, index), as in summary.csv


@dataclass
class Comparison:
    """The result of :func:`compare_pooled`.

    :ivar rows: the table: one dict per scalar parameter with ``site``, ``client``,
        ``index``, then ``<method>_mean`` and ``<method>_sd`` for every method run
        (``federated``, ``pooled_svi``, ``nuts``, ``reference``), ``<method>_z`` and
        ``<method>_sd_ratio`` against :attr:`reference` for the other methods, and
        ``fed_vs_pooled_z`` (``(mean_fed - mean_pooled) / sd_pooled``) and
        ``fed_vs_pooled_sd_ratio``. Missing values are ``nan``.
    :ivar methods: the methods with columns, in order.
    :ivar reference: the method the ``z`` and sd ratios are against (``"reference"``,
        ``"nuts"``), or ``None``.
    :ivar timings: wall seconds per method (``federated``: the fit's rounds).
    :ivar elbo: ELBO estimates of the variational fits (same estimator and particles).
    :ivar draws: ``{method: {site: draws}}``; global ``(n, *shape)``, per client
        ``(n, clients, *shape)``.
    :ivar clients: the client names (the order of the clients axis).
    :ivar per_client: the sites that have one value per client.
    :ivar settings: budgets and seeds, for reports.
    :ivar diagnostics: NUTS diagnostics (divergences, min effective sample size, max
        R-hat over parameters) when NUTS ran.
    """

    rows: List[Dict[str, Any]]
    methods: Tuple[str, ...]
    reference: Optional[str]
    timings: Dict[str, float] = field(default_factory=dict)
    elbo: Dict[str, float] = field(default_factory=dict)
    draws: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    clients: Tuple[str, ...] = ()
    per_client: Tuple[str, ...] = ()
    settings: Dict[str, Any] = field(default_factory=dict)
    diagnostics: Dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> List[str]:
        """The column names of :attr:`rows`, in order."""
        cols = ["site", "client", "index"]
        for m in self.methods:
            cols += [f"{m}_mean", f"{m}_sd"]
        for m in self.methods:
            if self.reference is not None and m != self.reference:
                cols += [f"{m}_z", f"{m}_sd_ratio"]
        if FEDERATED in self.methods and POOLED_SVI in self.methods:
            cols += ["fed_vs_pooled_z", "fed_vs_pooled_sd_ratio"]
        return cols

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Max and median ``|z|`` and min/max sd ratio, per method, over global and local rows.

        :returns: ``{"<method> global": {"max_abs_z", "median_abs_z", "min_sd_ratio",
            "max_sd_ratio", "n"}, "<method> local": ..., "fed_vs_pooled all": ...}``;
            "local" covers the rows with a client. Methods without a reference are left out.
        """
        out: Dict[str, Dict[str, float]] = {}
        targets = [m for m in self.methods if self.reference and m != self.reference]
        for m in targets + ["fed_vs_pooled"]:
            prefix = m if m != "fed_vs_pooled" else "fed_vs_pooled"
            if f"{prefix}_z" not in self.columns:
                continue
            for kind in ("global", "local", "all"):
                chosen = [
                    r for r in self.rows if kind == "all" or (kind == "local") == bool(r["client"])
                ]
                zs = [abs(r[f"{prefix}_z"]) for r in chosen if math.isfinite(r[f"{prefix}_z"])]
                ratios = [
                    r[f"{prefix}_sd_ratio"]
                    for r in chosen
                    if math.isfinite(r[f"{prefix}_sd_ratio"])
                ]
                if zs:
                    out[f"{m} {kind}"] = {
                        "max_abs_z": max(zs),
                        "median_abs_z": statistics.median(zs),
                        "min_sd_ratio": min(ratios),
                        "max_sd_ratio": max(ratios),
                        "n": len(zs),
                    }
        return out

    def to_markdown(self, max_clients: Optional[int] = None) -> str:
        """The table as markdown, then the timings, ELBOs and NUTS diagnostics.

        :param max_clients: show the local rows of the first this many clients only
            (the statistics line below still covers every row).
        """
        names = set(self.clients[:max_clients]) if max_clients is not None else None
        methods = self.methods
        head = ["site", "client", "index"]
        head += [f"{LABELS[m]} mean" for m in methods] + [f"{LABELS[m]} sd" for m in methods]
        zcols = [m for m in methods if self.reference is not None and m != self.reference]
        head += [f"z {LABELS[m]}" for m in zcols] + [f"sd ratio {LABELS[m]}" for m in zcols]
        fvp = "fed_vs_pooled_z" in self.columns
        if fvp:
            head += ["fed − pooled (pooled sd)"]
        lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
        shown = 0
        for r in self.rows:
            if names is not None and r["client"] and r["client"] not in names:
                continue
            shown += 1
            cells = [r["site"], r["client"], r["index"]]
            cells += [_fmt(r[f"{m}_mean"]) for m in methods]
            cells += [_fmt(r[f"{m}_sd"]) for m in methods]
            cells += [_fmt(r[f"{m}_z"], "+.2f") for m in zcols]
            cells += [_fmt(r[f"{m}_sd_ratio"], ".2f") for m in zcols]
            if fvp:
                cells.append(_fmt(r["fed_vs_pooled_z"], "+.3f"))
            lines.append("| " + " | ".join(cells) + " |")
        text = ["\n".join(lines), ""]
        if shown < len(self.rows):
            text += [f"({shown} of {len(self.rows)} rows shown; all are in comparison.csv.)", ""]
        if self.reference is not None:
            text.append(
                f"z = (mean − mean_ref) / sd_ref and sd ratio = sd / sd_ref against "
                f"**{LABELS[self.reference]}**."
            )
            text.append("")
        stats = self.stats()
        if stats:
            text += [
                "| method | sites | max abs z | median abs z | sd ratio min | sd ratio max |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for key, s in stats.items():
                method, kind = key.rsplit(" ", 1)
                label = LABELS.get(method, "federated vs pooled VI")
                text.append(
                    f"| {label} | {kind} ({s['n']}) | {s['max_abs_z']:.3f} | "
                    f"{s['median_abs_z']:.3f} | {s['min_sd_ratio']:.3f} | "
                    f"{s['max_sd_ratio']:.3f} |"
                )
            text.append("")
        text += ["| method | wall time | ELBO |", "|---|---:|---:|"]
        for m in self.methods:
            if m in self.timings or m in self.elbo:
                t = f"{self.timings[m]:.2f} s" if m in self.timings else ""
                e = f"{self.elbo[m]:.3f}" if m in self.elbo else ""
                text.append(f"| {LABELS[m]} | {t} | {e} |")
        text.append("")
        if self.diagnostics:
            d = self.diagnostics
            text.append(
                f"NUTS: {d.get('divergences', 0)} divergent transitions; smallest effective "
                f"sample size {d.get('min_ess', float('nan')):.0f}; largest R-hat "
                f"{d.get('max_rhat', float('nan')):.3f} (one chain: split R-hat)."
            )
            text.append("")
        return "\n".join(text)

    def to_csv(self, path: Union[str, os.PathLike]) -> Path:
        """Write :attr:`rows` to ``path`` (full precision; ``nan`` where missing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({c: r[c] for c in self.columns})
        return path

    def to_inference_data(self) -> Dict[str, Any]:
        """``{label: arviz.InferenceData}``, one posterior per method that has draws."""
        import arviz as az

        out = {}
        for m, draws in self.draws.items():
            posterior, dims = {}, {}
            for site, value in draws.items():
                array = value.detach().cpu().numpy()[None]  # one chain
                posterior[site] = array
                extra = [f"{site}_dim_{k}" for k in range(array.ndim - 2)]
                if site in self.per_client:
                    extra = ["client"] + extra[1:]
                dims[site] = extra
            out[LABELS[m]] = az.from_dict(
                posterior=posterior, coords={"client": list(self.clients)}, dims=dims
            )
        return out

    def plot_forest(self, path=None, var_names: Optional[Sequence[str]] = None, max_clients=20):
        """``arviz.plot_forest`` of every method side by side (90% HDI, quartiles).

        :param path: write a PNG here when given.
        :param var_names: sites to draw (default: all).
        :param max_clients: draw the local sites of the first this many clients only.
        :returns: the matplotlib figure.
        """
        import arviz as az

        from .report import new_figure

        idatas = self.to_inference_data()
        names = list(idatas)
        sites = list(var_names) if var_names is not None else list(next(iter(self.draws.values())))
        coords = {"client": list(self.clients[:max_clients])}
        rows = 0
        for site in sites:
            value = next(iter(self.draws.values()))[site]
            shape = list(value.shape[1:])
            if site in self.per_client:
                shape[0] = min(shape[0], max_clients)
            rows += math.prod(shape)
        fig = new_figure(8.0, min(max(3.0, 0.3 * rows * 1.2 + 1.5), 80.0))
        ax = fig.add_subplot()
        az.plot_forest(
            [idatas[n] for n in names],
            model_names=names,
            var_names=sites,
            coords=coords,
            combined=True,
            hdi_prob=0.9,
            ax=ax,
            show=False,
        )
        title = "federated vs pooled VI vs NUTS: 90% HDI, quartiles"
        if self.reference == REFERENCE:
            title += "\n(the external reference is a summary: its mean and sd are in the table)"
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
        return fig


def _fmt(x: float, spec: str = ".4g") -> str:
    return "" if x is None or not math.isfinite(x) else format(x, spec)


__all__ = [
    "FEDERATED",
    "LABELS",
    "NUTS_KEY",
    "POOLED_SVI",
    "REFERENCE",
    "Comparison",
    "Key",
]
