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

Usage::

    python benchmarks/tuning_free.py                 # every model, markdown table
    python benchmarks/tuning_free.py epil cbpp       # some models
    python benchmarks/tuning_free.py --out benchmarks/results/tuning_free.md
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


def _reference(path: Path, clients):
    """``{(site, client, flat index): (mean, sd)}`` from either reference format."""
    summary = json.loads(path.read_text())["reference_summary"]
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


def run_case(name, spec_text, ref_path, seed, draws):
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
    reference = _reference(ref_path, list(fit.data.names))
    position = {}
    stats = {"global": ([], []), "local": ([], [])}
    for row in rows:
        key = (row["site"], row["client"])
        j = position.get(key, 0)
        position[key] = j + 1
        if (row["site"], row["client"], j) not in reference:
            continue
        mean, sd = reference[(row["site"], row["client"], j)]
        if sd == 0.0:  # a constant element (the fixed entries of an LKJ Cholesky factor)
            continue
        kind = "local" if row["client"] else "global"
        stats[kind][0].append(abs(row["mean"] - mean) / sd)
        stats[kind][1].append(row["sd"] / sd)
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


def table(results) -> str:
    head = (
        "| model | clients | server | rounds | PSIS rounds | verdict | k-hat | global max abs z "
        "| global sd ratio | local max abs z | local sd ratio | fit s | NUTS s (ref) | outcome |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in results:
        g, loc = r["stats"]["global"], r["stats"]["local"]
        nuts = f"{r['nuts_seconds']:.1f}" if r["nuts_seconds"] else "-"
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['server']} | {r['rounds']} | "
            f"{r['psis_rounds']} | {r['verdict']} | "
            f"{r['k_hat']:.2f} | {max(g[0]) if g[0] else float('nan'):.3f} | {_range(g[1])} | "
            f"{max(loc[0]) if loc[0] else float('nan'):.3f} | {_range(loc[1])} | "
            f"{r['seconds']:.1f} | {nuts} | {r['outcome']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=4000, help="posterior draws per fit")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    cases = _cases()
    names = args.models or list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(cases)}")
    results = []
    for name in names:
        spec_text, ref = cases[name]
        result = run_case(name, spec_text, ref, args.seed, args.draws)
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
    text = "\n".join(header) + table(results) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
