"""How a fit ended, in words: the verdict lines of the CLI and ``report.md``.

:attr:`FederatedSVI.verdict <hbfl_pyro.FederatedSVI.verdict>` is a dict (``status``,
``rounds``, and after a PSIS round ``k_hat`` and ``reliable``). :func:`verdict_lines` turns
it into one line of text and, when the fit did not reach what it claims, a warning
banner: a fit that did not converge, or whose posterior failed its importance-sampling
check, says so loudly.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .convergence import WINDOW
from .psis_check import MEAN_SHIFT_OK, SD_RATIO_OK, local_limits, locals_close

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

        >>> verdict_lines({"status": "converged", "rounds": 5, "k_hat": 0.3, "psis_rounds": 1})[0]
        'converged in 5 rounds (+1 PSIS round); PSIS Pareto k-hat 0.30 (< 0.7: reliable)'
    """
    status, rounds = verdict.get("status", "not checked"), verdict.get("rounds")
    line = status if rounds is None else f"{status} in {rounds} round{'s' * (rounds != 1)}"
    psis = verdict.get("psis_rounds")
    if rounds is not None and psis:  # the second-order server's rounds that checked q
        line += f" (+{psis} PSIS round{'s' * (psis != 1)})"
    if status == "not checked":
        line = f"{rounds} rounds run; no convergence check ran on them"
    k_hat = verdict.get("k_hat")
    if k_hat is not None and _of_q(verdict):  # q's own moments are reported
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
    if _of_q(verdict) and k_hat is not None and k_hat >= K_HAT_GOOD:
        problems.append(
            f"the fit failed its importance-sampling check (k-hat {k_hat:.2f} >= "
            f"{K_HAT_GOOD}): q(phi) prod_i q_i(theta_i), whose means and sds are reported, "
            "is not close to the posterior (an unconverged fit, or a guide family too "
            "poor for it: mean-field shrinks sds). Do not use it as it stands: run more "
            "rounds, try a richer --guide, or drop the first-order options so that the "
            "second-order server runs where it applies."
        )
    ratio = verdict.get("q_sd_ratio")
    if _of_q(verdict) and ratio is not None and k_hat is not None and k_hat < K_HAT_RELIABLE:
        shift, (low, high) = verdict["q_mean_shift"], ratio
        if shift > MEAN_SHIFT_OK or not SD_RATIO_OK[0] <= low <= high <= SD_RATIO_OK[1]:
            problems.append(
                f"q's own moments, which are reported, differ from the importance-weighted "
                f"posterior's: means up to {shift:.2f} sd apart, sds {low:.2f}-{high:.2f} "
                f"of the weighted ones (worst: {verdict.get('q_worst_site')!r}; close is "
                f"<= {MEAN_SHIFT_OK} sd and {SD_RATIO_OK[0]}-{SD_RATIO_OK[1]}). A guide "
                "family too poor for the posterior (mean-field shrinks sds) or an "
                "unconverged fit: try a richer --guide, or drop the first-order options "
                "so that the second-order server runs where it applies."
            )
    if (
        _of_q(verdict)
        and "local_mean_shift" in verdict
        and k_hat is not None
        and k_hat < K_HAT_RELIABLE
        and not locals_close(verdict)
    ):
        shift_ok, (low_ok, high_ok) = local_limits(verdict)
        low, high = verdict["local_sd_ratio"]
        problems.append(
            f"the clients' local factors q_i, whose moments are reported, differ from the "
            f"importance-weighted posterior of their locals: means up to "
            f"{verdict['local_mean_shift']:.2f} sd apart, sds {low:.2f}-{high:.2f} of the "
            f"weighted ones (worst: {verdict.get('local_worst')!r}; close is <= "
            f"{shift_ok:.2f} sd and {low_ok:.2f}-{high_ok:.2f} with this check's Monte Carlo "
            "error). The local blocks are not at their optimum (too few local steps a "
            "round) or their family is too poor: drop the first-order options so that the "
            "second-order server runs where it applies, or raise local_steps."
        )
    if _of_q(verdict) and verdict.get("check_error"):
        problems.append(
            f"the PSIS check of this first-order fit could not run ({verdict['check_error']})"
            ": compare it with --compare-pooled before use."
        )
    if status == "not checked" and k_hat is None:
        problems.append(
            "no convergence check ran on these rounds (they ran outside this fit, e.g. in "
            "Flower): the posterior may be far from the optimum. Compare it with "
            "--compare-pooled, or fit in-process, where the stopping rule runs."
        )
    monitored = verdict.get("monitored_rounds")
    if status == "max rounds reached" and monitored is not None and monitored < 2 * WINDOW:
        problems.append(
            f"only {monitored} rounds ran; the stopping rule compares two windows of "
            f"{WINDOW} rounds, so convergence was not established. Run more rounds, or "
            "none given (run until converged)."
        )
    elif status in ("max rounds reached", "diverged"):
        problems.append(
            f"the fit did not converge ({status}): its posterior is that of the best point "
            "found, not of the posterior mode. Run more rounds (--rounds) or check the model."
        )
    if not _of_q(verdict) and k_hat is not None and k_hat >= K_HAT_RELIABLE:
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


def _of_q(verdict: Dict) -> bool:
    """Whether the verdict's k-hat is that of q itself (a first-order fit reports q's own
    moments), rather than of a PSIS-corrected posterior."""
    return verdict.get("k_hat_of") == "q" or verdict.get("status") == "not checked"
