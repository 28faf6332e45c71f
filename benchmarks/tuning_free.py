"""Tuning-free benchmark (issues 13 and 20): untuned models fitted with defaults only.

Every model is fitted by the same command: ``FederatedSVI(model, data, seed=S)`` and
``run()`` with no options (what ``hbfl fit FILE`` does for a file without
``fit_options``), and compared with a long NUTS reference on the pooled data:

- ``benchmarks/tuning_free/models/*.py``: models written as a user would write them, each
  with a NumPyro NUTS reference in ``benchmarks/tuning_free/references/`` (4 chains,
  R-hat < 1.01, bulk ESS > 1,000; made by ``benchmarks/tuning_free/reference.py``);
- the zoo models with external references in ``../shared/data/reference_posteriors``
  (eight schools, surgical, seeds; both parametrisations).

Per model: the server the library chose, Newton rounds (+1 PSIS round), the verdict and
PSIS k-hat, max ``|z|`` = ``|mean - mean_ref| / sd_ref`` and the range of
``sd / sd_ref`` over the global and over the local parameters (every client), the fit's
wall time and the reference NUTS run's (from its provenance: a different process, so
a rough ratio only). A row passes when every mean is within 0.25 reference sd and every
sd ratio in [0.8, 1.2], or when the fit's own verdict flags it.

Comparison columns (issue 13), only when asked; each runs in this process right after the
fit, on the same pooled data, and the pass/fail rule above does not read them:

- ``--pooled-svi``: pooled Pyro SVI, the family closest to the library's ``q``: the same
  Pyro model on all clients' data in one call (``fit.data.collate()``), Pyro's
  ``AutoMultivariateNormal`` over every latent site (globals and each client's locals),
  with one fixed recipe for every model (:data:`POOLED_SVI`: ``Trace_ELBO``, 8 particles,
  ClippedAdam at lr 0.01 until the smoothed ELBO plateaus, then at lr 0.001 and at lr
  0.0001 until it plateaus again, at most 40,000 steps), then ``--draws`` draws. Columns:
  its wall time and steps, fit time / pooled SVI time, ``max |fed mean - pooled mean| /
  pooled sd`` over every global and local element, the ELBO gap (``fit.elbo()``, the
  second-order server's estimate over ``q(z)``'s draws with the locals integrated out by
  the clients, minus pooled SVI's final ``Trace_ELBO`` estimate with 1,000 particles;
  nats, > 0 when the fit's bound is higher), and pooled SVI's own max ``|z|`` and sd
  ratios against the reference (which of the two is closer).
- ``--nuts-time``: NumPyro NUTS on the model's twin (``tuning_free/numpyro_models.py``)
  timed here (:data:`NUTS_RUN`: 4 chains x (1000 warm-up + 1000 draws),
  ``chain_method="sequential"``, the reference's per-model settings; JIT compilation
  included); columns: its wall time, fit time / NUTS time, and its own max ``|z|``
  against the long reference. The zoo models have no twin: "-".
- ``--compare``: both. ``--threads N``: ``torch.set_num_threads(N)`` for the fit and
  pooled SVI (default: torch's own choice, as before).

A comparison that raises is reported ("failed" cells, the error under the table); the
other rows go on.

Usage::

    python benchmarks/tuning_free.py                 # every model, markdown table
    python benchmarks/tuning_free.py epil cbpp       # some models
    python benchmarks/tuning_free.py --out benchmarks/results/tuning_free.md
    python benchmarks/tuning_free.py cbpp --compare  # with pooled SVI and NUTS timed here
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "tuning_free"
SHARED = ROOT.parent / "shared" / "data" / "reference_posteriors"
sys.path.insert(0, str(ROOT / "models"))

ZOO = {
    "eight_schools:noncentered": ("eight_schools", SHARED / "eight_schools_posteriordb.json"),
    "eight_schools:centered": ("eight_schools", SHARED / "eight_schools_posteriordb.json"),
    "surgical:noncentered": ("surgical", SHARED / "surgical_selfgen.json"),
    "surgical:centered": ("surgical", SHARED / "surgical_selfgen.json"),
    "seeds:noncentered": ("seeds", SHARED / "seeds_stanified_selfgen.json"),
    "seeds:centered": ("seeds", SHARED / "seeds_stanified_selfgen.json"),
}


def _cases():
    """``{name: (model-file spec, reference path)}``: the suite's models, then the zoo's."""
    cases = {}
    for path in sorted((SUITE / "models").glob("*.py")):
        if not path.stem.startswith("_"):
            cases[path.stem] = (str(path), SUITE / "references" / f"{path.stem}.json")
    for name, (stem, ref) in ZOO.items():
        variant = name.split(":")[1]
        cases[name] = (f"{ROOT / 'models' / stem}.py:{variant}", ref)
    return cases


def _reference(path, clients):
    """``{(site, client, flat index): (mean, sd)}`` from either reference format (a JSON
    file, or its ``reference_summary`` dict)."""
    summary = path if isinstance(path, dict) else json.loads(path.read_text())["reference_summary"]
    out = {}
    for key, value in summary.items():
        if "[" in key:  # posteriordb style: "theta[3]" (1-based, one client each)
            site, index = key[:-1].split("[")
            out[(site, clients[int(index) - 1], 0)] = (value["mean"], value["sd"])
            continue
        mean, sd = np.asarray(value["mean"], float), np.asarray(value["sd"], float)
        if mean.ndim and mean.shape[0] == len(clients) and len(clients) > 1:
            for i, client in enumerate(clients):
                for j, (m, s) in enumerate(zip(mean[i].reshape(-1), sd[i].reshape(-1))):
                    out[(key, client, j)] = (float(m), float(s))
        else:
            for j, (m, s) in enumerate(zip(mean.reshape(-1), sd.reshape(-1))):
                out[(key, "", j)] = (float(m), float(s))
    return out


def _nuts_seconds(path: Path):
    provenance = json.loads(path.read_text()).get("provenance", {})
    return provenance.get("wall_seconds")


#: Pooled SVI's one recipe, for every model (no per-model tuning): Pyro's
#: ``AutoMultivariateNormal`` over all latent sites, started as the library's "full-rank"
#: family starts (``init_to_feasible``: every unconstrained value 0; the autoguide's own
#: ``init_to_median`` overflows on surgical's InverseGamma(0.001, 0.001)), init scale 0.1;
#: ``Trace_ELBO`` with ``particles`` vectorised particles, ``ClippedAdam`` (gradients
#: clipped at 10, as ``hbfl_pyro.pooled``). Learning rate ``lrs[0]`` until the smoothed ELBO
#: plateaus, then each next one of ``lrs`` (a fresh Adam state each) until it plateaus
#: again. (One particle and two rates ended ships and cbpp 0.13 and 0.08 nats below 20,000
#: steps of Adam decaying from 0.01 to 0.0001; with 8 particles and a third rate they end
#: within 0.04 nats of it or above, in about 8,000 steps.) Smoothed ELBO: the mean loss over
#: windows of ``window`` steps; a plateau: no window better than the best one so far in
#: ``patience`` windows. At most ``max_steps`` steps in all. Then ``elbo_particles``
#: particles for the final ELBO estimate and ``--draws`` draws for the moments.
POOLED_SVI = dict(
    lrs=(0.01, 0.001, 0.0001),
    particles=8,
    window=250,
    patience=4,
    max_steps=40000,
    elbo_particles=1000,
)

#: The in-run NUTS: NumPyro on the model's twin (``tuning_free/numpyro_models.py``), the
#: reference's own per-model settings (target acceptance, mass matrix, non-centred sites;
#: ``reference.SETTINGS``) with 4 chains x (1000 warm-up + 1000 draws), run one chain after
#: the other (2 cores, and the federated fit also runs in one process).
NUTS_RUN = dict(warmup=1000, samples=1000, chain_method="sequential")


def _plateau_svi(model, guide, batch, seed):
    """Pooled ``Trace_ELBO`` steps with :data:`POOLED_SVI`'s plateau rule; returns the
    losses and the steps run at each learning rate."""
    from pyro.infer import Trace_ELBO
    from pyro.optim.clipped_adam import ClippedAdam

    from hbfl_pyro.guides import private_params
    from hbfl_pyro.seeding import seeded

    window, patience = POOLED_SVI["window"], POOLED_SVI["patience"]
    particles = POOLED_SVI["particles"]
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1)
    losses, phases = [], []
    with private_params(), seeded(seed):
        for lr in POOLED_SVI["lrs"]:
            optim = ClippedAdam(list(guide.parameters()), lr=lr)
            start, best, since_best = len(losses), float("inf"), 0
            while since_best < patience and len(losses) < POOLED_SVI["max_steps"]:
                for _ in range(window):
                    optim.zero_grad()
                    loss = elbo.differentiable_loss(model, guide, batch)
                    loss.backward()
                    optim.step()
                    losses.append(loss.item())
                smoothed = float(np.mean(losses[-window:]))
                if not np.isfinite(smoothed):
                    raise FloatingPointError(f"pooled SVI: non-finite loss at step {len(losses)}")
                best, since_best = (smoothed, 0) if smoothed < best else (best, since_best + 1)
            phases.append(len(losses) - start)
    return losses, phases


def pooled_svi(fit, rows, draws, seed):
    """Pooled Pyro SVI (:data:`POOLED_SVI`) on the fit's model and the pooled data of its
    clients: wall time, steps, ELBO estimate and ``{(site, client, index): (mean, sd)}``
    of the latent sites; and the federated-vs-pooled difference in pooled sd."""
    from pyro.infer.autoguide import AutoMultivariateNormal, init_to_feasible

    from hbfl_pyro.compare import element_moments, pooled_draws, predictive_draws, site_layout
    from hbfl_pyro.pooled import fit_pooled_svi, pooled_elbo
    from hbfl_pyro.seeding import derive_seed

    model, structure = fit.model, fit.structure
    batch = fit.data.collate()
    start = time.perf_counter()
    # fit_pooled_svi with no steps: builds and initialises the guide (module-local params).
    guide, _ = fit_pooled_svi(
        model,
        fit.data,
        AutoMultivariateNormal(model, init_loc_fn=init_to_feasible),
        steps=0,
        seed=derive_seed(seed, "init"),
    )
    losses, phases = _plateau_svi(model, guide, batch, derive_seed(seed, "pooled svi"))
    seconds = time.perf_counter() - start
    latent = list(structure.global_sites) + list(structure.local_sites)
    layout = {s: v for s, v in site_layout(model, batch, structure).items() if s in latent}
    samples = predictive_draws(
        model, batch, latent, draws, derive_seed(seed, "svi draws"), guide=guide
    )
    per_client = {s: tuple(fit.data.names) for s, (pc, _) in layout.items() if pc}
    moments = element_moments(pooled_draws(samples, layout, structure.plate_dim), per_client)
    elbo = pooled_elbo(
        model, guide, fit.data, POOLED_SVI["elbo_particles"], seed=derive_seed(seed, "elbo")
    )
    diffs = [
        abs(row["mean"] - moments[key][0]) / moments[key][1]
        for row in rows
        if (key := (row["site"], row["client"], row["index"])) in moments and moments[key][1] > 0
    ]
    return {
        "seconds": seconds,
        "steps": len(losses),
        "phases": phases,
        "elbo": elbo,
        "moments": moments,
        "fed_vs_pooled": max(diffs) if diffs else float("nan"),
        "compared": len(diffs),
    }


def _guarded(function, name, *args):
    """``function(*args)``, or ``{"error": ...}`` if it raises (one comparison that fails
    does not end the benchmark; its cells read "failed")."""
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
        message = f"{type(exc).__name__}: {exc}"[:200]
        print(f"{name}: {function.__name__} failed: {message}", file=sys.stderr, flush=True)
        return {"error": message}


def nuts_in_run(name, seed):
    """NumPyro NUTS on the twin (:data:`NUTS_RUN`), timed here; ``None`` without a twin.
    The time is ``MCMC.run`` and the draws' transfer, JIT compilation included."""
    sys.path.insert(0, str(SUITE))
    from numpyro_models import TWINS

    if name not in TWINS:
        return None
    from reference import run_reference

    result = run_reference(
        name,
        seed,
        NUTS_RUN["chain_method"],
        check=False,
        warmup=NUTS_RUN["warmup"],
        samples=NUTS_RUN["samples"],
    )
    return {
        "seconds": result["provenance"]["wall_seconds"],
        "summary": result["reference_summary"],
        "clients": result["clients"],
        "divergences": result["diagnostics"]["divergences"],
        "max_r_hat": result["diagnostics"]["max_r_hat"],
        "min_ess_bulk": result["diagnostics"]["min_ess_bulk"],
    }


def matched_rows(rows, reference):
    """``(row, j, reference mean, reference sd)`` for each summary row with a reference
    value (``j``: the row's flat index within its site and client); constant elements
    (sd 0: the fixed entries of an LKJ Cholesky factor) are left out."""
    position = {}
    for row in rows:
        key = (row["site"], row["client"])
        j = position.get(key, 0)
        position[key] = j + 1
        if (row["site"], row["client"], j) not in reference:
            continue
        mean, sd = reference[(row["site"], row["client"], j)]
        if sd == 0.0:
            continue
        yield row, j, mean, sd


def run_case(name, spec_text, ref_path, seed, draws, pooled=False, nuts=False):
    from hbfl_pyro import FederatedSVI
    from hbfl_pyro.modelfile import load_model_file
    from hbfl_pyro.summary import posterior_summary

    spec = load_model_file(spec_text)
    data = spec.load_data()
    # Defaults only: a zoo file's fit_options (first-order settings tuned by hand) are
    # ignored; only the data layout (per_client) is taken from the file.
    layout = {k: v for k, v in spec.options.items() if k == "per_client"}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = FederatedSVI(spec.model, data, seed=seed, **layout)
        fit.run(progress=False)  # until converged, either server
    seconds = time.perf_counter() - start
    rows = posterior_summary(fit, num_samples=draws, seed=seed)
    # The comparisons, in the same process right after the fit (timed each on its own).
    svi = _guarded(pooled_svi, name, fit, rows, draws, seed) if pooled else None
    mcmc = _guarded(nuts_in_run, name, name, seed) if nuts else None
    failed = {
        "error": (svi or {}).pop("error", None),
        "nuts_error": (mcmc or {}).pop("error", None),
    }
    svi = None if failed["error"] else svi
    mcmc = None if failed["nuts_error"] else mcmc
    reference = _reference(ref_path, list(fit.data.names))
    short_nuts = _reference(mcmc["summary"], mcmc["clients"]) if mcmc else {}
    stats = {"global": ([], []), "local": ([], [])}
    svi_stats, nuts_z = ([], []), []
    for row, j, mean, sd in matched_rows(rows, reference):
        kind = "local" if row["client"] else "global"
        stats[kind][0].append(abs(row["mean"] - mean) / sd)
        stats[kind][1].append(row["sd"] / sd)
        if svi is not None:
            moments = svi["moments"].get((row["site"], row["client"], row["index"]))
            if moments is not None:
                svi_stats[0].append(abs(moments[0] - mean) / sd)
                svi_stats[1].append(moments[1] / sd)
        if (row["site"], row["client"], j) in short_nuts:
            nuts_z.append(abs(short_nuts[(row["site"], row["client"], j)][0] - mean) / sd)
    verdict = fit.verdict
    zs = stats["global"][0] + stats["local"][0]
    ratios = stats["global"][1] + stats["local"][1]
    within = max(zs) <= 0.25 and 0.8 <= min(ratios) and max(ratios) <= 1.2
    # Flagged: the fit's own verdict says it did not reach what it claims.
    flagged = verdict.get("status") in ("max rounds reached", "diverged") or (
        "reliable" in verdict and not verdict["reliable"]
    )
    return {
        "model": name,
        "clients": len(fit.data),
        "server": fit.server.mode,
        "rounds": verdict.get("rounds", fit.round),
        "psis_rounds": verdict.get("psis_rounds", 0),
        "verdict": verdict.get("status"),
        "k_hat": verdict.get("k_hat", float("nan")),
        "stats": stats,
        "compared": len(zs),
        "seconds": seconds,
        "nuts_seconds": _nuts_seconds(ref_path),
        "elbo": fit.elbo(),
        "pooled": None
        if svi is None
        else {k: v for k, v in svi.items() if k != "moments"} | {"stats": svi_stats},
        "nuts": None
        if mcmc is None
        else {k: v for k, v in mcmc.items() if k not in ("summary", "clients")}
        | {"max_abs_z": max(nuts_z) if nuts_z else float("nan")},
        "pooled_requested": pooled,
        "nuts_requested": nuts,
        "pooled_error": failed["error"] if pooled else None,
        "nuts_error": failed["nuts_error"] if nuts else None,
        "outcome": "pass" if within else ("flagged" if flagged else "SILENTLY WRONG"),
        "warnings": sorted(
            {
                str(w.message)[:80]
                for w in caught
                if w.category.__name__ in ("ConvergenceWarning", "ClientFailureWarning")
            }
        ),
    }


def _range(values):
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def _ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def _num(x, spec=".3f"):
    return format(x, spec) if x is not None and np.isfinite(x) else "-"


def table(results) -> str:
    pooled = any(r.get("pooled_requested") for r in results)
    nuts = any(r.get("nuts_requested") for r in results)
    head = (
        "| model | clients | server | rounds | PSIS rounds | verdict | k-hat | global max abs z "
        "| global sd ratio | local max abs z | local sd ratio | fit s | NUTS s (ref) |"
    )
    columns = 13
    if pooled:
        head += (
            " pooled SVI s (steps) | fit / pooled SVI time | fed-pooled max abs diff (pooled sd)"
            " | ELBO fed - pooled (nats) | pooled SVI max abs z | pooled SVI sd ratio |"
        )
        columns += 6
    if nuts:
        head += " NUTS s (this run) | fit / NUTS time | NUTS (this run) max abs z |"
        columns += 3
    lines = [head + " outcome |", "|" + "---|" * (columns + 1)]
    for r in results:
        g, loc = r["stats"]["global"], r["stats"]["local"]
        nuts_ref = f"{r['nuts_seconds']:.1f}" if r["nuts_seconds"] else "-"
        line = (
            f"| {r['model']} | {r['clients']} | {r['server']} | {r['rounds']} | "
            f"{r['psis_rounds']} | {r['verdict']} | "
            f"{r['k_hat']:.2f} | {max(g[0]) if g[0] else float('nan'):.3f} | {_range(g[1])} | "
            f"{max(loc[0]) if loc[0] else float('nan'):.3f} | {_range(loc[1])} | "
            f"{r['seconds']:.1f} | {nuts_ref} |"
        )
        if pooled:
            p = r.get("pooled")
            if p is None:
                line += (" failed |" if r.get("pooled_error") else " - |") * 6
            else:
                zs, ratios = p["stats"]
                line += (
                    f" {p['seconds']:.1f} ({p['steps']}) | {_ratio(r['seconds'], p['seconds'])} |"
                    f" {_num(p['fed_vs_pooled'])} | {_num(r['elbo'] - p['elbo'], '+.2f')} |"
                    f" {_num(max(zs) if zs else None)} | {_range(ratios)} |"
                )
        if nuts:
            n = r.get("nuts")
            if n is None:
                line += (" failed |" if r.get("nuts_error") else " - |") * 3
            else:
                div = f" ({n['divergences']} divergent)" if n["divergences"] else ""
                line += (
                    f" {n['seconds']:.1f}{div} | {_ratio(r['seconds'], n['seconds'])} |"
                    f" {_num(n['max_abs_z'])} |"
                )
        lines.append(line + f" {r['outcome']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=4000, help="posterior draws per fit")
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument(
        "--pooled-svi",
        action="store_true",
        help="also fit pooled Pyro SVI (AutoMultivariateNormal, one fixed recipe) per model",
    )
    parser.add_argument(
        "--nuts-time",
        action="store_true",
        help="also time NumPyro NUTS (4 chains x (1000 + 1000), sequential) in this run",
    )
    parser.add_argument("--compare", action="store_true", help="both --pooled-svi and --nuts-time")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for the fit and pooled SVI (default: torch's own choice)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pooled, nuts = args.pooled_svi or args.compare, args.nuts_time or args.compare
    torch.set_default_dtype(torch.float64)
    cases = _cases()
    names = args.models or list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(cases)}")
    results = []
    for name in names:
        spec_text, ref = cases[name]
        result = run_case(name, spec_text, ref, args.seed, args.draws, pooled, nuts)
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    import pyro

    header = [
        "# Tuning-free benchmark: defaults only",
        "",
        f"`python benchmarks/tuning_free.py` (seed {args.seed}, {args.draws} draws per fit); "
        f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads. NUTS seconds: the reference run's own wall time "
        "(NumPyro, 4 chains; from its provenance, another process).",
        "",
    ]
    flags = " ".join(
        f
        for f, on in (
            ("--pooled-svi", pooled),
            ("--nuts-time", nuts),
            (f"--threads {args.threads}", args.threads),
        )
        if on
    )
    if flags:
        header[2] = header[2].replace("tuning_free.py`", f"tuning_free.py {flags}`")
    if pooled:
        header += [
            "Pooled SVI: the same Pyro model on all clients' data in one call, "
            "`AutoMultivariateNormal` over every latent site (globals and each client's "
            "locals; started at unconstrained 0, `init_to_feasible`), Trace_ELBO "
            f"({POOLED_SVI['particles']} vectorised particles), ClippedAdam at lr "
            f"{POOLED_SVI['lrs'][0]} until "
            f"the mean loss over {POOLED_SVI['window']}-step windows has not improved for "
            f"{POOLED_SVI['patience']} windows, then the same at lr "
            + " and at lr ".join(str(lr) for lr in POOLED_SVI["lrs"][1:])
            + f" (at most {POOLED_SVI['max_steps']} steps in all); the same recipe for "
            f"every model. Its seconds: guide set-up and steps (not the {args.draws} draws, nor "
            f"the final ELBO estimate with {POOLED_SVI['elbo_particles']} particles). "
            "fed-pooled: max |fed mean - pooled mean| / pooled sd over every global and local "
            "element. ELBO fed - pooled: the fit's ELBO estimate (`fit.elbo()`: E_q[log p(z) + "
            "sum_i log p_i(y_i | z) - log q(z)] over q(z)'s own draws in the PSIS round, the "
            "locals integrated out by the clients) minus pooled SVI's (joint q over globals "
            "and locals); nats, > 0: the fit's bound is higher. Pooled SVI max abs z and sd "
            "ratio: against the same reference as the fit's columns.",
            "",
        ]
    if nuts:
        header += [
            "NUTS s (this run): NumPyro NUTS on the model's twin "
            "(`tuning_free/numpyro_models.py`) timed in this process right after the fit: 4 "
            f"chains x ({NUTS_RUN['warmup']} warm-up + {NUTS_RUN['samples']} draws), "
            f"chain_method={NUTS_RUN['chain_method']!r}, the reference's per-model settings "
            "(target acceptance, mass matrix, non-centred sites), JIT compilation included; "
            "its max abs z is against the long reference (the Monte Carlo error of a run of "
            "that length). Zoo models have no twin: '-'.",
            "",
        ]
    errors = [
        f"- {r['model']}: {what} failed: {r[key]}"
        for r in results
        for what, key in (("pooled SVI", "pooled_error"), ("NUTS", "nuts_error"))
        if r.get(key)
    ]
    text = "\n".join(header) + "\n" + table(results) + "\n"
    if errors:
        text += "\n" + "\n".join(errors) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
