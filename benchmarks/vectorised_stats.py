"""Round time of the vectorised engine against the per-client loop, for statistical models.

For each number of clients N the same model, data, seeds and settings are fitted with
``engine="inprocess"`` (a Python loop over client objects) and ``engine="vectorised"``
(the round's clients as one batched computation); the table gives the median wall time
of a round over the timed rounds and the ratio, both measured in this one run.

    python benchmarks/vectorised_stats.py                 # N = 10, 100, 400, 1000 + IRT
    python benchmarks/vectorised_stats.py --clients 10 100 --rounds 3 --no-irt

The synthetic model is a radon-like varying-intercept regression with a global slope and
noise scale inside the likelihood (gradient server mode), each client holding 2 to 20
observations. The last row is ``models/item_response.py`` (2PL item-response model of the
LSAT, one client per student, 400 students) with its own ``fit_options``. A round's time
includes the server's work (messages, reply checks, update), which the engines share; the
"engine" column is the vectorised engine's own share of the round.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from hbfl_pyro import FederatedSVI, num_clients
from hbfl_pyro.modelfile import fit_settings


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 5.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(2.0))
    x, y, mask = data["x"], data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(mu, sigma_a))
        with pyro.plate("obs", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(alpha + beta * x, sigma_y), obs=y)


def make_clients(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clients = {}
    for i in range(n):
        size = int(torch.randint(2, 21, (), generator=gen))
        x = torch.randn(size, generator=gen)
        alpha = 1.0 + 0.5 * torch.randn((), generator=gen)
        clients[f"c{i:04d}"] = {
            "x": x,
            "y": alpha + 0.7 * x + 0.3 * torch.randn(size, generator=gen),
        }
    return clients


def round_times(engine: str, model_fn, clients, rounds: int, **options):
    """Median wall time of a round and of the engine's part of it (one warm-up round)."""
    fit = FederatedSVI(model_fn, clients, seed=0, engine=engine, **options)
    inner, engine_times = fit.engine.run_round, []

    def timed(messages):
        start = time.perf_counter()
        out = inner(messages)
        engine_times.append(time.perf_counter() - start)
        return out

    fit.engine.run_round = timed
    fit.step()  # warm-up round (first-call costs), not timed
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fit.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(engine_times[1:])


def item_response_case():
    """The item-response model file, its 400 students and its fit options (no rounds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import item_response

    options, _ = fit_settings(item_response.guide_options["mean-field"])
    options.pop("engine", None)
    options["per_client"] = item_response.per_client
    return item_response.model, item_response.load_data(), options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 400, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--loop-max", type=int, default=1000, help="largest N to loop over")
    parser.add_argument("--no-irt", action="store_true", help="skip the item-response row")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    print(f"# vectorised vs loop round time ({time.strftime('%Y-%m-%d')})")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; seeds 0; "
        f"median of {args.rounds} rounds after 1 warm-up; synthetic: local steps "
        f"{args.local_steps}, other settings default"
    )
    print()
    print("| model | clients | loop s/round | vectorised s/round (engine) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    cases = [
        ("synthetic", model, make_clients(n), {"local_steps": args.local_steps})
        for n in args.clients
    ]
    if not args.no_irt:
        cases.append(("item response", *item_response_case()))
    for label, model_fn, clients, options in cases:
        n = len(clients)
        vec, eng = round_times("vectorised", model_fn, clients, args.rounds, **options)
        if n <= args.loop_max:
            loop, _ = round_times("inprocess", model_fn, clients, args.rounds, **options)
            print(f"| {label} | {n} | {loop:.3f} | {vec:.4f} ({eng:.4f}) | {loop / vec:.1f}x |")
        else:
            print(f"| {label} | {n} | (skipped) | {vec:.4f} ({eng:.4f}) | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
