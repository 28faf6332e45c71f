"""A NUTS reference posterior for the radon model, written as a JSON summary.

``compare_pooled``'s default NUTS run (300 warm-up + 500 draws on the *centred* model) mixes
poorly on radon: ``sigma_a`` and the 85 county effects form a funnel (measured with 1,000 +
2,000 draws: min bulk ESS 69, max R-hat 1.06). This script samples the non-centred model
(``models/radon.py:noncentered``, the same posterior) with several chains and writes
``{"reference_summary": {site: {"mean", "sd"}}, "diagnostics": ...}``, which
``compare_pooled(reference=...)``, ``hbfl fit --compare-pooled --reference FILE`` and
``benchmarks/zoo_fidelity.py`` read.

Usage::

    python benchmarks/radon_reference.py --out benchmarks/results/radon_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

import radon  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from pyro.infer.mcmc.util import diagnostics  # noqa: E402

from hbfl_pyro import FederatedData  # noqa: E402
from hbfl_pyro.seeding import seeded  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000, help="draws per chain")
    parser.add_argument("--chains", type=int, default=2, help="run one after another")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/radon_reference.json"))
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    data = FederatedData(radon.load_data())
    batch = data.collate()
    start = time.perf_counter()
    chains = []
    for chain in range(args.chains):
        with seeded(args.seed + chain):
            mcmc = MCMC(
                NUTS(radon.noncentered, jit_compile=True, target_accept_prob=0.9),
                warmup_steps=args.warmup,
                num_samples=args.samples,
                disable_progbar=True,
            )
            mcmc.run(batch)
        chains.append(mcmc.get_samples(group_by_chain=True))
    samples = {k: torch.cat([c[k] for c in chains]) for k in chains[0]}  # (chains, draws, ...)
    diag = diagnostics(samples)
    # The county effects, alpha = g0 + g1 u + sigma_a alpha_raw: (chains, draws, counties).
    raw = samples["alpha_raw"].reshape(*samples["g0"].shape, -1)
    alpha = (
        samples["g0"][..., None]
        + samples["g1"][..., None] * batch["log_uranium"]
        + samples["sigma_a"][..., None] * raw
    )
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
    summary = {
        site: {"mean": float(flat[site].mean()), "sd": float(flat[site].std())}
        for site in ("g0", "g1", "beta", "sigma_a", "sigma_y")
    }
    alpha = alpha.reshape(-1, alpha.shape[-1])
    summary["alpha"] = {"mean": alpha.mean(0).tolist(), "sd": alpha.std(0).tolist()}
    ess = min(float(d["n_eff"].min()) for d in diag.values() if "n_eff" in d)
    rhat = max(float(d["r_hat"].max()) for d in diag.values() if "r_hat" in d)
    out = {
        "model": "models/radon.py:noncentered (the same posterior as radon.model)",
        "method": f"Pyro NUTS, {args.chains} chains x ({args.warmup} warm-up + {args.samples} "
        f"draws), target_accept_prob 0.9, seeds {args.seed}..{args.seed + args.chains - 1}",
        "clients": data.names,
        "reference_summary": summary,
        "diagnostics": {"min_ess": ess, "max_rhat": rhat, "seconds": time.perf_counter() - start},
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["diagnostics"]), {k: v for k, v in summary.items() if k != "alpha"})


if __name__ == "__main__":
    main()
