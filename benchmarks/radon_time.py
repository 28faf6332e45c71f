"""Radon: wall time of the federated fit (vectorised engine) to reach pooled SVI's ELBO.

Target (issue 4): the federated fit of radon reaches the pooled-SVI converged ELBO within
1 nat in no more than 3x pooled SVI's wall time.

Both ELBOs are estimated by the same estimator: Pyro's ``Trace_ELBO`` on the pooled data
(:func:`hbfl_pyro.pooled.pooled_elbo`) with many particles; the federated fit is evaluated
through :func:`hbfl_pyro.pooled.joint_guide_of` (its global and local factors, as one
pooled guide). Evaluation time is excluded from both wall times.

1. Pooled SVI (``AutoNormal``, the settings of ``tests/test_zoo.py``: 3000 steps, lr 0.05
   decayed 100-fold, 16 particles), checkpointed every ``--check-every`` steps; its
   converged ELBO is the estimate after the last step; its wall time is that of all steps.
2. Federated fits (``engine="vectorised"``) with each configuration, checkpointed every
   ``--check-every-rounds`` rounds: the first time their ELBO estimate is within 1 nat of
   the pooled one.

Usage::

    python benchmarks/radon_time.py                 # model-file settings + a few others
    python benchmarks/radon_time.py --configs default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

import radon  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402

from hbfl_pyro import FederatedData, FederatedSVI  # noqa: E402
from hbfl_pyro.guides import private_params  # noqa: E402
from hbfl_pyro.modelfile import fit_settings  # noqa: E402
from hbfl_pyro.pooled import joint_guide_of, pooled_elbo  # noqa: E402
from hbfl_pyro.seeding import seeded  # noqa: E402

# Federated configurations: the model file's mean-field settings, and honest variations of them
# (rounds, local steps, step sizes), each with its decay spread over its own rounds.
CONFIGS = {
    "default": {},  # radon.guide_options["mean-field"]: 250 rounds, 3 local steps
    "150 rounds": {"rounds": 150},
    "100 rounds, 5 local": {"rounds": 100, "local_steps": 5},
    "100 rounds, lr 0.3": {"rounds": 100, "server_lr": 0.3, "local_lr": 0.15},
    "60 rounds, 5 local, lr 0.3": {
        "rounds": 60,
        "local_steps": 5,
        "server_lr": 0.3,
        "local_lr": 0.15,
    },
}


def _options(config):
    # The file states its decays over the run: fit_settings spreads them over `rounds`.
    options, rounds = fit_settings({**radon.guide_options["mean-field"], **config})
    options["engine"] = "vectorised"
    return options, rounds


def pooled(data, steps, check_every, particles, seed):
    batch = data.collate()
    trace = []
    elapsed = 0.0
    with private_params(), seeded(seed):
        guide = AutoNormal(radon.model)
        svi = SVI(
            radon.model,
            guide,
            ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / steps)}),
            Trace_ELBO(num_particles=16, vectorize_particles=True),
        )
        for step in range(1, steps + 1):
            start = time.perf_counter()
            svi.step(batch)
            elapsed += time.perf_counter() - start
            if step % check_every == 0 or step == steps:
                trace.append((step, elapsed, pooled_elbo(radon.model, guide, data, particles)))
    return trace


def federated(data, config, check_every, particles, seed):
    options, rounds = _options(config)
    fit = FederatedSVI(radon.model, data, seed=seed, **options)
    trace, elapsed = [], 0.0
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        fit.step()
        elapsed += time.perf_counter() - start
        if r % check_every == 0 or r == rounds:
            elbo = pooled_elbo(radon.model, joint_guide_of(fit), data, particles)
            trace.append((r, elapsed, elbo))
    return trace


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--pooled-steps", type=int, default=3000)
    parser.add_argument("--check-every", type=int, default=100, help="pooled steps")
    parser.add_argument("--check-every-rounds", type=int, default=10)
    parser.add_argument("--particles", type=int, default=2000, help="ELBO estimate particles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    data = FederatedData(radon.load_data())
    # MC sd of a 2000-particle estimate here: about 0.2 nats (sd of one particle's ELBO ~10).
    print(f"radon: {len(data)} clients; ELBO estimates with {args.particles} particles")
    ptrace = pooled(data, args.pooled_steps, args.check_every, args.particles, args.seed)
    target = ptrace[-1][2]
    pooled_time = ptrace[-1][1]
    reach = next(t for _, t, e in ptrace if e >= target - 1.0)
    print(
        f"pooled SVI: {args.pooled_steps} steps, {pooled_time:.1f} s, converged ELBO "
        f"{target:.2f}; within 1 nat of it after {reach:.1f} s"
    )
    print()
    print("| federated config | rounds | wall s (all rounds) | final ELBO | reached target at "
          "| time to target / pooled SVI time |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.configs:
        ftrace = federated(data, CONFIGS[name], args.check_every_rounds, args.particles, args.seed)
        hit = next(((r, t) for r, t, e in ftrace if e >= target - 1.0), None)
        hit_text = f"round {hit[0]}, {hit[1]:.1f} s" if hit else "not reached"
        ratio = f"{hit[1] / pooled_time:.2f}x" if hit else "-"
        print(
            f"| {name} | {ftrace[-1][0]} | {ftrace[-1][1]:.1f} | {ftrace[-1][2]:.2f} | "
            f"{hit_text} | {ratio} |",
            flush=True,
        )
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
