"""Which second-order form is the default: Laplace or variational (issue 20, point 1).

The second-order server's Gaussian ``q(z)`` over the globals' unconstrained values can be
built two ways from the clients' summed Laplace marginals ``F(z) = log p(z) + sum_i L_i(z)``:

- **Laplace** (the library's default): trust-region Newton to the mode ``z*``;
  ``q = N(z*, (-Hess F(z*))^-1)``.
- **Variational** (the Bayesian learning rule / variational online Newton with step 1):
  from the Laplace ``q``, iterate ``S <- -E_q[Hess F]``, ``m <- m + S^-1 E_q[grad F]``,
  the expectations over the ``2d`` symmetric sigma points of ``q`` (exact for quadratic
  ``F``); its fixed point is the Gaussian variational optimum's stationarity condition.
  Each iteration is one more federated round in which every client returns its Laplace
  marginal's gradient and Hessian at ``2d`` points (``2d`` times a Newton round's work).

Both ``q`` then go through the same PSIS rounds (federated importance sampling with each
client's local draws, Pareto smoothing, refinement while k-hat >= 0.5), so the question is
which proposal the PSIS rounds need fewer rounds and less compute to correct, and which
ends closer to NUTS. Run on the tuning-free benchmark's models (defaults only)::

    python benchmarks/second_order_forms.py --threads 1 --out FILE.md

(the table of record: ``benchmarks/results/second_order_forms.md``).

The variational iterations are evaluated in this process for all clients at once (what
each client would compute in those rounds, summed); their time is counted in full.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import grad, hessian

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tuning_free  # noqa: E402  (the benchmark's models, references and comparisons)

MAX_ITERATIONS = 20
#: Stop when the mean moves by less than this (in the metric of the new precision) and
#: the precision changes by less than this (relative Frobenius norm).
TOL = 1e-3


def batch_marginal(fit):
    """A :class:`~hbfl_pyro.laplace_marginal.LaplaceMarginal` over all of ``fit``'s clients."""
    from hbfl_pyro.data import collate
    from hbfl_pyro.laplace_marginal import LaplaceMarginal

    clients = list(fit.clients.values())
    per_client = clients[0].per_client
    batch = collate([c.data for c in clients], per_client=per_client)
    server = fit.server
    return LaplaceMarginal(server.model, fit.structure, batch, server.layout, per_client)


def variational_gaussian(fit, marginal):
    """Variational online Newton with step 1 from the Laplace ``q``; returns
    ``(mean, covariance, iterations, converged)``."""
    server = fit.server
    mean, covariance = server.posterior["mean"], server.posterior["covariance"]
    precision = torch.linalg.inv(covariance)
    d = mean.numel()
    start = marginal.initial_locals()
    prior_grad, prior_hess = grad(server.log_prior), hessian(server.log_prior)
    for iteration in range(1, MAX_ITERATIONS + 1):
        chol = torch.linalg.cholesky(torch.linalg.inv(precision))
        offsets = math.sqrt(d) * torch.cat([chol.T, -chol.T])  # rows: L e_j, -L e_j
        g_sum, h_sum = torch.zeros(d), torch.zeros(d, d)
        for point in mean + offsets:
            modes = marginal.modes(point, start)
            _, g, h = marginal.derivatives(point, modes)
            g_sum += g.sum(0) + prior_grad(point).detach()
            h_sum += h.sum(0) + prior_hess(point).detach()
        expected_g, expected_h = g_sum / len(offsets), h_sum / len(offsets)
        new_precision = -(expected_h + expected_h.T) / 2
        if int(torch.linalg.cholesky_ex(new_precision)[1]) != 0:
            return mean, torch.linalg.inv(precision), iteration, False
        step = torch.linalg.solve(new_precision, expected_g)
        moved = float(torch.sqrt(step @ new_precision @ step))
        changed = float((new_precision - precision).norm() / precision.norm())
        mean, precision = mean + step, new_precision
        if moved < TOL and changed < TOL:
            return mean, torch.linalg.inv(precision), iteration, True
    return mean, torch.linalg.inv(precision), MAX_ITERATIONS, False


def fit_form(spec, data, layout, seed, form):
    """One fit with the given form; returns ``(fit, seconds, extra)``."""
    from hbfl_pyro import FederatedSVI

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = FederatedSVI(spec.model, data, seed=seed, **layout)
        extra = {"iterations": 0, "von_converged": "-", "von_seconds": 0.0}
        if form == "variational":
            while fit.server.phase == "newton":
                fit.step()
            began = time.perf_counter()
            mean, covariance, iterations, converged = variational_gaussian(fit, batch_marginal(fit))
            extra.update(
                iterations=iterations,
                von_converged=converged,
                von_seconds=time.perf_counter() - began,
            )
            fit.server.posterior = {"mean": mean, "covariance": (covariance + covariance.T) / 2}
        fit.run(progress=False)
    return fit, time.perf_counter() - start, extra


def accuracy(fit, reference_path, draws, seed):
    """Max |z| and the sd-ratio range against the long NUTS reference (globals and locals
    together)."""
    from hbfl_pyro.summary import posterior_summary

    reference = tuning_free._reference(reference_path, list(fit.data.names))
    rows = posterior_summary(fit, num_samples=draws, seed=seed)
    zs, ratios = [], []
    for row, _, mean, sd in tuning_free.matched_rows(rows, reference):
        zs.append(abs(row["mean"] - mean) / sd)
        ratios.append(row["sd"] / sd)
    return max(zs), min(ratios), max(ratios)


def main(argv=None) -> None:
    from hbfl_pyro.modelfile import load_model_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    cases = tuning_free._cases()
    header = (
        "| model | form | Newton rounds | VON rounds | PSIS rounds | first k-hat | k-hat | "
        "max abs z | sd ratio | fit s | VON s | outcome |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for name in args.models or list(cases):
        spec_text, reference_path = cases[name]
        spec = load_model_file(spec_text)
        data = spec.load_data()
        layout = {k: v for k, v in spec.options.items() if k == "per_client"}
        for form in ("laplace", "variational"):
            fit, seconds, extra = fit_form(spec, data, layout, args.seed, form)
            verdict = fit.verdict
            stages = fit.server.posterior.get("stages", [])
            z, low, high = accuracy(fit, reference_path, args.draws, args.seed)
            within = z <= 0.25 and 0.8 <= low and high <= 1.2
            flagged = not verdict.get("reliable", True)
            line = (
                f"| {name} | {form} | {verdict['rounds']} | {extra['iterations']} | "
                f"{verdict.get('psis_rounds', '-')} | {stages[0]['k_hat']:.2f} | "
                f"{verdict.get('k_hat', float('nan')):.2f} | {z:.3f} | {low:.2f}-{high:.2f} | "
                f"{seconds:.1f} | {extra['von_seconds']:.1f} | "
                f"{'pass' if within else ('flagged' if flagged else 'MISS')} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.out:
        import pyro

        text = [
            "# Second-order forms: Laplace vs variational (issue 20, point 1)",
            "",
            f"`python benchmarks/second_order_forms.py --threads {args.threads or 'default'}` "
            f"(seed {args.seed}, {args.draws} draws); torch {torch.__version__}, "
            f"pyro {pyro.__version__}. Newton rounds: the trust-region rounds to the mode "
            "(the same for both forms); VON rounds: the variational iterations after them "
            "(each 2d points per client); PSIS rounds: the importance-sampling rounds that "
            "correct q; first k-hat: that of the first PSIS round (of q itself); fit s: "
            "the whole fit, VON s: its variational iterations.",
            "",
            *lines,
            "",
        ]
        Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
