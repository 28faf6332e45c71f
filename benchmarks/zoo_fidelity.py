"""Zoo fidelity: every zoo model, mean-field and richer guides, vs references and pooled fits.

For each model and guide family it runs a federated fit, then
:func:`hbfl_pyro.compare.compare_pooled` (pooled Pyro SVI with the same family, and NUTS
where no external reference exists), and prints one markdown row: max/median ``|z|`` and
min/max sd ratio over the global and over the local parameters against the reference
(external when ``../shared/data/reference_posteriors`` has one, the exact posterior for
Normal–Normal, else a NUTS run), federated vs pooled-VI max ``|z|`` (in pooled sd), wall
times (federated, pooled SVI, NUTS) and the ELBOs.

Guides: the named families of :func:`hbfl_pyro.guides.guide_family`: ``mean-field``
(AutoNormal x AutoNormal), ``structured`` (AutoNormal x StructuredLocalNormal),
``full-rank`` (AutoMultivariateNormal x AutoNormal), ``low-rank``
(AutoLowRankMultivariateNormal x AutoNormal), ``full+struct`` (AutoMultivariateNormal x
StructuredLocalNormal), ``laplace`` (AutoNormal x LaplaceLocalNormal), ``full+laplace``
(AutoMultivariateNormal x LaplaceLocalNormal), ``spline+laplace``
(AutoSplineMultivariateNormal x LaplaceLocalNormal); each fitted with its model file's settings
for that family (``guide_options``, else ``fit_options``). Targets (issue 4): every mean
within 0.25 sd of the reference and sd ratios in [0.8, 1.2] with the best guide; federated
vs pooled VI within 0.05 sd.

Usage::

    python benchmarks/zoo_fidelity.py --quick        # eight schools (non-centred), all guides
    python benchmarks/zoo_fidelity.py                # every model, every guide (hours on 2 cores)
    python benchmarks/zoo_fidelity.py --models radon --guides mean-field structured
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT.parent / "shared" / "data" / "reference_posteriors"
RADON_REF = ROOT / "benchmarks" / "results" / "radon_reference.json"
sys.path.insert(0, str(ROOT / "models"))

import eight_schools  # noqa: E402
import normal_normal  # noqa: E402
import radon  # noqa: E402
import seeds  # noqa: E402
import sleepstudy  # noqa: E402
import surgical  # noqa: E402

from hbfl_pyro import FederatedSVI  # noqa: E402
from hbfl_pyro.compare import compare_pooled  # noqa: E402
from hbfl_pyro.guides import GUIDE_FAMILIES  # noqa: E402
from hbfl_pyro.modelfile import fit_settings, load_model_file  # noqa: E402

GUIDES = list(GUIDE_FAMILIES)

# Normal–Normal's mean-field fit uses the closed-form server with the settings of
# tests/test_closed_form.py; its other guide families, its file's guide_options.
_CLOSED = {
    "rounds": 12,
    "local_steps": 100,
    "local_lr": 0.1,
    "local_lr_decay": 0.65,
    "num_particles": 2,
}


def _exact_normal_normal():
    mean, cov = normal_normal.exact_posterior(normal_normal.load_data())
    sd = cov.diagonal().sqrt()
    return {
        "mu": {"mean": float(mean[0]), "sd": float(sd[0])},
        "theta": {"mean": mean[1:].tolist(), "sd": sd[1:].tolist()},
    }


# name: (module, model attribute, reference (a JSON path, a callable, or None: NUTS))
MODELS = {
    "eight_schools noncentered": (
        eight_schools,
        "noncentered",
        REFS / "eight_schools_posteriordb.json",
    ),
    "eight_schools centered": (eight_schools, "centered", REFS / "eight_schools_posteriordb.json"),
    "normal_normal": (normal_normal, "model", _exact_normal_normal),
    "surgical noncentered": (surgical, "noncentered", REFS / "surgical_selfgen.json"),
    "surgical centered": (surgical, "centered", REFS / "surgical_selfgen.json"),
    "seeds noncentered": (seeds, "noncentered", REFS / "seeds_stanified_selfgen.json"),
    "seeds centered": (seeds, "centered", REFS / "seeds_stanified_selfgen.json"),
    "sleepstudy": (sleepstudy, "model", None),
    # The long NUTS run of benchmarks/radon_reference.py when it has been written (the
    # short default NUTS run mixes poorly on radon's funnel), else that short run.
    "radon": (radon, "model", RADON_REF if RADON_REF.exists() else None),
}
QUICK = ["eight_schools noncentered"]


def _fit(module, attribute, guide_name, seed):
    if module is normal_normal and guide_name == "mean-field":
        options, rounds = fit_settings(_CLOSED)
    else:  # the model file's settings for this guide family (its guide_options)
        spec = load_model_file(f"{module.__file__}:{attribute}", guide=guide_name)
        options, rounds = spec.options, spec.rounds
    fit = FederatedSVI(getattr(module, attribute), module.load_data(), seed=seed, **options)
    fit.run(rounds, progress=False)
    return fit


def _fmt(stats, key, kind):
    s = stats.get(f"{key} {kind}")
    if s is None:
        return "- | - | -"
    return (
        f"{s['max_abs_z']:.2f} | {s['median_abs_z']:.2f} | "
        f"{s['min_sd_ratio']:.2f}-{s['max_sd_ratio']:.2f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="eight schools only, all guides")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all")
    parser.add_argument("--guides", nargs="*", choices=GUIDES, default=GUIDES)
    parser.add_argument("--pooled-steps", type=int, default=3000)
    parser.add_argument("--pooled-particles", type=int, default=16)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=20000, help="VI draws per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every comparison's stats here")
    args = parser.parse_args(argv)
    models = QUICK if args.quick else (args.models or list(MODELS))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    print(
        "| model | guide | reference | global max abs z | global median | global sd ratio "
        "| local max abs z | local median | local sd ratio | fed vs pooled max abs z "
        "| fed s | pooled SVI s | NUTS s | ELBO fed | ELBO pooled |"
    )
    print("|---|---|---|" + "---:|" * 12)
    results = []
    for name in models:
        module, attribute, ref = MODELS[name]
        reference = ref() if callable(ref) else ref
        ref_label = "external" if isinstance(ref, Path) else ("exact" if ref else "NUTS")
        nuts_time = None
        for guide_name in args.guides:
            try:
                fit = _fit(module, attribute, guide_name, args.seed)
            except (ValueError, RuntimeError) as exc:
                # A diverged fit (e.g. NaN variational parameters) is a result too: record
                # it and go on with the next guide.
                reason = " ".join(str(exc).split())[:80]
                print(f"| {name} | {guide_name} | {ref_label} | failed: {reason} |" + " |" * 11)
                results.append({"model": name, "guide": guide_name, "failed": reason})
                continue
            nuts = False
            if reference is None:  # the first guide runs NUTS; later ones reuse its summary
                nuts = {"warmup": args.nuts_warmup, "samples": args.nuts_samples}
            c = compare_pooled(
                fit,
                svi={"steps": args.pooled_steps, "num_particles": args.pooled_particles},
                nuts=nuts,
                reference=reference,
                num_samples=args.draws,
                elbo_particles=2000,
                seed=args.seed,
                progress=False,
            )
            if reference is None:
                reference = {
                    (r["site"], r["client"], r["index"]): (r["nuts_mean"], r["nuts_sd"])
                    for r in c.rows
                }
                nuts_time = c.timings["nuts"]
            stats = c.stats()
            method = "federated"
            fvp = stats.get("fed_vs_pooled all", {}).get("max_abs_z", math.nan)
            t = c.timings
            print(
                f"| {name} | {guide_name} | {ref_label} | {_fmt(stats, method, 'global')} | "
                f"{_fmt(stats, method, 'local')} | {fvp:.3f} | {t['federated']:.0f} | "
                f"{t.get('pooled_svi', math.nan):.0f} | "
                f"{nuts_time if nuts_time is not None else math.nan:.0f} | "
                f"{c.elbo['federated']:.2f} | {c.elbo.get('pooled_svi', math.nan):.2f} |",
                flush=True,
            )
            # Per global parameter (the scales are where the families differ most).
            per_global = {
                f"{r['site']}{'' if r['index'] in ('', None) else r['index']}": (
                    r.get("federated_z", math.nan),
                    r.get("federated_sd_ratio", math.nan),
                )
                for r in c.rows
                if not r["client"]
            }
            print(
                "|   globals (z, sd ratio): "
                + ", ".join(f"{k} {z:+.2f} {ratio:.2f}" for k, (z, ratio) in per_global.items())
                + " |"
                + " |" * 14
            )
            results.append(
                {
                    "model": name,
                    "guide": guide_name,
                    "stats": stats,
                    "globals": per_global,
                    "timings": t,
                    "elbo": c.elbo,
                }
            )
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(
        f"\nfederated: each model file's settings for the guide family (seed {args.seed}); "
        f"pooled SVI: {args.pooled_steps} steps, {args.pooled_particles} particles, lr 0.05 "
        "decayed 100-fold; NUTS (no "
        f"external reference): {args.nuts_warmup} warm-up + {args.nuts_samples} draws, one "
        f"chain; {args.draws} draws per VI method. Wall times on this machine "
        f"(torch {torch.__version__}, 1 thread). {time.strftime('%Y-%m-%d %H:%M')}"
    )


if __name__ == "__main__":
    main()
