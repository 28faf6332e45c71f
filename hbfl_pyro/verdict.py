"""How a fit ended, in words: the verdict lines of the CLI and ``report.md``.

:attr:`FederatedSVI.verdict <hbfl_pyro.FederatedSVI.verdict>` is a dict (``status``,
``rounds``, and after a PSIS round ``k_hat`` and ``reliable``). :func:`verdict_lines` turns
it into one line of text and, when the fit did not reach what it claims, a warning
banner: a fit that did not converge, or whose posterior failed its importance-sampling
check, says so loudly.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

#: Pareto k-hat at or above which importance-sampling estimates are unreliable.
K_HAT_RELIABLE = 0.7
#: Pareto k-hat below which the proposal itself is close to the target ("good" in Vehtari
#: et al.'s reading): a first-order fit reports q's own moments, not importance-weighted
#: ones, so its check needs this (eight schools' mean-field fit: k-hat 0.59, tau's sd
#: 0.76 of the reference).
K_HAT_GOOD = 0.5


def verdict_lines(verdict: Dict) -> Tuple[str, Optional[List[str]]]:
    """``(line, banner)``: one line describing ``verdict``, and a banner (lines of text)
    when the fit must not be trusted as it stands, else ``None``.

    Example::

        >>> verdict_lines({"status": "converged", "rounds": 5, "k_hat": 0.3})[0]
        'converged in 5 rounds; PSIS Pareto k-hat 0.30 (< 0.7: reliable)'
    """
    status, rounds = verdict.get("status", "not checked"), verdict.get("rounds")
    line = status if rounds is None else f"{status} in {rounds} rounds"
    if status == "not checked":
        line = f"{rounds} rounds run; this server has no stopping rule (no convergence check)"
    k_hat = verdict.get("k_hat")
    if k_hat is not None and status == "not checked":  # q's own moments are reported
        reading = "< 0.5: q is close to the posterior" if k_hat < K_HAT_GOOD else "UNRELIABLE"
        line += f"; PSIS check of q: Pareto k-hat {k_hat:.2f} ({reading})"
    elif k_hat is not None:
        reading = "< 0.7: reliable" if k_hat < K_HAT_RELIABLE else ">= 0.7: UNRELIABLE"
        line += f"; PSIS Pareto k-hat {k_hat:.2f} ({reading})"
    problems = verdict_problems(verdict)
    banner = None
    if problems:
        unchecked = status == "not checked" and k_hat is None
        what = "not checked" if unchecked else "not trustworthy"
        banner = ["!" * 78, f"WARNING: this posterior is {what}"]
        banner += [f"- {p}" for p in problems] + ["!" * 78]
    return line, banner


def verdict_problems(verdict: Dict) -> List[str]:
    """Why the fit must not be trusted as it stands (empty when nothing is wrong).

    Example::

        >>> verdict_problems({"status": "converged", "rounds": 5, "k_hat": 0.3})
        []
        >>> verdict_problems({"status": "not checked", "rounds": 300, "k_hat": 0.3})
        []
    """
    status, k_hat = verdict.get("status"), verdict.get("k_hat")
    problems = []
    if status == "not checked" and k_hat is not None:
        if k_hat >= K_HAT_GOOD:
            problems.append(
                f"the fit failed its importance-sampling check (k-hat {k_hat:.2f} >= "
                f"{K_HAT_GOOD}): q(phi) prod_i q_i(theta_i), whose means and sds are reported, "
                "is not close to the posterior (an unconverged fit, or a guide family too "
                "poor for it: mean-field shrinks sds). Do not use it as it stands: run more "
                "rounds, try a richer --guide, or drop the first-order options so that the "
                "second-order server runs where it applies."
            )
    elif status == "not checked" and verdict.get("check_error"):
        problems.append(
            "the PSIS check of this first-order fit could not run "
            f"({verdict['check_error']}), and there is no stopping rule: compare it with "
            "--compare-pooled before use."
        )
    elif status == "not checked":
        problems.append(
            "no convergence check ran: first-order servers have no stopping rule yet, so "
            "the posterior may be far from the optimum after these rounds. Compare it with "
            "--compare-pooled, or drop the first-order options so that the second-order "
            "server (with its verdict and PSIS check) runs where it applies."
        )
    if status in ("max rounds reached", "diverged"):
        problems.append(
            f"the fit did not converge ({status}): its posterior is that of the best point "
            "found, not of the posterior mode. Run more rounds (--rounds) or check the model."
        )
    if status != "not checked" and k_hat is not None and k_hat >= K_HAT_RELIABLE:
        problems.append(
            f"the posterior failed its importance-sampling check (k-hat {k_hat:.2f} >= "
            f"{K_HAT_RELIABLE}): a Gaussian in the globals' unconstrained space is not "
            "close to this posterior. Do not use it as it stands: reparametrise the model, "
            "or fit with --server gradient --guide spline+laplace and compare."
        )
    dropped = verdict.get("dropped_clients")
    if dropped:
        problems.append(
            f"client(s) {dropped} kept failing and were dropped (on_client_failure='drop'): "
            "their data are NOT in this posterior."
        )
    unevaluated = verdict.get("unevaluated_draws", 0.0)
    if unevaluated > 0.01:
        problems.append(
            f"{unevaluated:.0%} of the PSIS draws could not be evaluated by some client (NaN): "
            "the weights describe a truncated posterior."
        )
    return problems
