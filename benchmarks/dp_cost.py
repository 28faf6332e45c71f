"""The accuracy cost of client-level differential privacy on the Normal-Normal zoo model.

Why this model: in closed-form mode a client's message is one number, ``E_q[theta_i]``,
with a known scale (``theta_i ~ 3 +- 2`` in ``models/normal_normal.py``), so a clip ``C``
that binds on almost no client is easy to state, and the server's update is a fixed
linear function of the noisy sum: the noise moves ``E_q[mu]`` by ``z C / N`` (times
``s^2 N / tau^2``, about 1) against a posterior sd of ``tau / sqrt(N)``: the cost in sd
units is about ``z C / (tau sqrt(N))``, so client-level DP is affordable only with many
clients. The closed form converges in a few rounds, and every round spends budget, so few
rounds matter. (Radon in gradient mode needs hundreds of Adam rounds on gradients whose
scale changes during the fit: its epsilon would be far larger for the same noise.)

For each number of clients ``N`` and noise multiplier ``z`` it runs the fit with fixed
seeds (data seed 1, run seeds 0..S-1, which also seed the server's noise) and reports
epsilon at delta = 1e-5 (exact GDP accountant, and the zCDP bound), and the cost against
the non-DP fit of the same run seed: ``|E[mu] - E_nonDP[mu]| / sd_nonDP(mu)`` and the mean
over clients of ``|E[theta_i] - E_nonDP[theta_i]| / sd_nonDP(theta_i)``, averaged over
seeds. ``q(mu)``'s sd does not depend on the data in this family, so its sd ratio is 1.

Run::

    python benchmarks/dp_cost.py                      # N = 100 and 1000, 3 seeds
    python benchmarks/dp_cost.py --clients 100 --seeds 1 --rounds 5

The vectorised engine runs the clients (simulation); it computes each client's summary
in one batch and the server's re-clipping applies the clip (identical arithmetic to
clipping on each client, which the in-process engine does).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

import normal_normal  # noqa: E402

from hbfl_pyro import FederatedSVI  # noqa: E402
from hbfl_pyro.dp import DPConfig, epsilon, message_norm  # noqa: E402

DELTA = 1e-5


def fit_once(data, rounds, seed, dp, local_steps, local_lr):
    fit = FederatedSVI(
        normal_normal.model,
        data,
        local_steps=local_steps,
        local_lr=local_lr,
        seed=seed,
        engine="vectorised",
        dp=dp,
    )
    fit.run(rounds, progress=False)
    params = fit.server.family_params
    locs, scales = [], []
    for client in fit.clients.values():
        locs.append(client.local_guide.locs.theta.detach().reshape(()))
        scales.append(client.local_guide.scales.theta.detach().reshape(()))
    clipped = 0
    if dp is not None:
        clipped = sum(bool(message_norm(r["stats"]) > dp.clip) for r in fit.server.stale.values())
    return (
        float(params["loc"]),
        float(params["scale"]),
        torch.stack(locs),
        torch.stack(scales),
        clipped,
        fit,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--local-lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)

    print("client-level DP cost on models/normal_normal.py (closed form, NormalNormal)")
    print(
        f"rounds {args.rounds}  local_steps {args.local_steps}  local_lr {args.local_lr}  "
        f"clip {args.clip}  delta {DELTA}  seeds 0..{args.seeds - 1}  engine vectorised"
    )
    print(
        f"torch {torch.__version__}  pyro {pyro.__version__}  python "
        f"{platform.python_version()}  {platform.machine()}"
    )
    header = (
        f"{'N':>5} {'z':>5} {'eps_gdp':>9} {'eps_zcdp':>9} {'clipped':>8} "
        f"{'|dmu|/sd':>9} {'predicted':>9} {'|dtheta|/sd':>12} "
        f"{'mu_mean':>8} {'mu_sd':>7} {'sec':>6}"
    )
    for n in args.clients:
        data = normal_normal.load_data(num_clients=n, seed=1)
        exact = normal_normal.mean_field_optimum(data)
        base = [fit_once(data, args.rounds, s, None, args.local_steps, args.local_lr) for s in
                range(args.seeds)]  # fmt: skip
        gap = abs(base[0][0] - float(exact["mu"][0])) / float(exact["mu"][1])
        print(
            f"\nN = {n}: non-DP E[mu] {base[0][0]:.4f} sd {base[0][1]:.4f}; analytic "
            f"mean-field optimum {float(exact['mu'][0]):.4f} (non-DP gap {gap:.3f} sd)"
        )
        print(header)
        for z in args.noise:
            start = time.perf_counter()
            dmu, dtheta, mus, clipped = [], [], [], 0
            for s in range(args.seeds):
                # Seeded noise, so that the table can be reproduced (a benchmark, not a
                # release: real runs draw fresh noise).
                dp = DPConfig(
                    clip=args.clip, noise_multiplier=z, delta=DELTA, reproducible_noise=True
                )
                mu, sd, locs, _, c, _ = fit_once(
                    data, args.rounds, s, dp, args.local_steps, args.local_lr
                )
                b_mu, b_sd, b_locs, b_scales, _, _ = base[s]
                dmu.append(abs(mu - b_mu) / b_sd)
                dtheta.append(float(((locs - b_locs).abs() / b_scales).mean()))
                mus.append(mu)
                clipped += c
            secs = (time.perf_counter() - start) / args.seeds
            eps = epsilon(z, args.rounds, DELTA)
            eps_z = epsilon(z, args.rounds, DELTA, "zcdp")
            # Without clipping, E[mu] moves by (s^2 / tau^2) * N(0, (z C)^2), so
            # E|dmu| / s = sqrt(2 / pi) z C s / tau^2 (the last round's noise only).
            pred = math.sqrt(2 / math.pi) * z * args.clip * sd / normal_normal.TAU**2
            print(
                f"{n:>5} {z:>5g} {eps:>9.3g} {eps_z:>9.3g} {clipped / args.seeds:>8.1f} "
                f"{sum(dmu) / len(dmu):>9.3f} {pred:>9.3f} {sum(dtheta) / len(dtheta):>12.3f} "
                f"{sum(mus) / len(mus):>8.4f} {sd:>7.4f} {secs:>6.1f}"
            )
    print(
        "\neps: epsilon at delta 1e-5 after all rounds (z = 0: clipping only, no privacy);"
        " clipped: clients whose last message exceeded the clip (mean over seeds);"
        " |dmu|/sd, |dtheta|/sd: distance of the DP posterior means from the non-DP fit of"
        " the same seed, in non-DP posterior sds (mean over seeds); predicted: its expectation"
        " from the noise alone (sqrt(2/pi) z C s / tau^2)."
    )


if __name__ == "__main__":
    main()
