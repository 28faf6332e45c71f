"""Issue 20's time target against Pyro's own NUTS: the default fit vs Pyro NUTS (1 chain,
1000 warm-up + 1000 draws) on the pooled data, timed one after the other in this process
on one torch thread.

Usage::

    python benchmarks/pyro_nuts_time.py models/eight_schools.py \\
        benchmarks/tuning_free/models/ships.py benchmarks/tuning_free/models/noise_sd.py

Prints one line per model file: the fit's seconds (``FederatedSVI(model, data,
seed=0).run()`` and 4000 posterior draws), Pyro NUTS's seconds, and their ratio (the
target: <= 0.1).
"""

from __future__ import annotations

import argparse
import time
import warnings

import pyro
import torch
from pyro.infer import MCMC, NUTS

from hbfl_pyro import FederatedData, FederatedSVI
from hbfl_pyro.modelfile import load_model_file


def time_model(spec: str, seed: int = 0) -> dict:
    """Seconds of the default fit and of Pyro NUTS (1 x (1000 + 1000)) on one model file."""
    mf = load_model_file(spec)
    data = FederatedData(mf.load_data(), mf.options.get("per_client", ()))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = FederatedSVI(mf.model, data, seed=seed)
        fit.run(progress=False)
        fit.global_samples(4000)
    fit_seconds = time.perf_counter() - start
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    mcmc = MCMC(
        NUTS(mf.model, jit_compile=False),
        num_samples=1000,
        warmup_steps=1000,
        num_chains=1,
        disable_progbar=True,
    )
    mcmc.run(data.collate())
    return {"fit": fit_seconds, "nuts": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_files", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    for spec in args.model_files:
        t = time_model(spec, args.seed)
        print(
            f"{spec}: fit {t['fit']:.1f} s, Pyro NUTS (1 x (1000 + 1000)) {t['nuts']:.1f} s, "
            f"ratio {t['fit'] / t['nuts']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
