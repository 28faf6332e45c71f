"""A stopping rule for first-order servers: window means of the ELBO and of q(phi).

A first-order (stochastic-gradient) fit never stops moving: with a constant step size its
parameters jitter around the optimum, and its ELBO estimate is noisy. So the rule compares
**window means** (rounds ``t-2W+1 .. t-W`` against ``t-W+1 .. t``), every ``W`` rounds:

- the smoothed ELBO is *flat* when the later window's mean gained less than two standard
  errors of the difference plus :data:`ELBO_TOL` nats (under DP the clients send no ELBO,
  and only the moments are judged);
- q(phi) is *still* when no global's mean moved by more than :data:`MOMENT_TOL` of its
  posterior sd, and no sd changed by more than that fraction (moments of draws of q(phi)
  with a fixed seed, so they change only when q(phi) does).

Flat and still: **converged**. Flat but not still is a *plateau*: the parameters jitter by
more than the tolerance around where they no longer improve the ELBO, so
:class:`~hbfl_pyro.FederatedSVI` halves the server's step size (at most
:data:`MAX_HALVINGS` times: a frozen step would look still without having converged).
Non-finite moments or ELBO: **diverged**. The rule is judged on q(phi) only (what the
server can see); the PSIS check of the joint approximation
(:mod:`hbfl_pyro.psis_check`) judges the rest.

Example::

    >>> import torch
    >>> monitor = WindowMonitor(window=2)
    >>> for elbo in (-10.0, -9.0, -9.0, -9.0):
    ...     status = monitor.update(elbo, torch.zeros(3), torch.ones(3))
    >>> status
    'converged'
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .seeding import seeded

#: Rounds per window (two windows are compared).
WINDOW = 20
#: Largest move of a global's mean, and relative change of its sd, in posterior sds, that
#: still counts as "still" (the fidelity targets are 0.1-0.25 sd).
MOMENT_TOL = 0.05
#: Nats a window's mean ELBO may still gain over the previous one and count as flat.
ELBO_TOL = 0.05
#: Most times a plateau halves the server's step size.
MAX_HALVINGS = 3
#: Draws of q(phi) behind its moments each round.
MOMENT_DRAWS = 200


class WindowMonitor:
    """Judges a first-order fit from one ELBO and q(phi)'s moments per round.

    :param window: rounds per window.
    :param moment_tol: see :data:`MOMENT_TOL`.
    :param elbo_tol: see :data:`ELBO_TOL`.
    """

    def __init__(
        self, window: int = WINDOW, moment_tol: float = MOMENT_TOL, elbo_tol: float = ELBO_TOL
    ):
        self.window, self.moment_tol, self.elbo_tol = window, moment_tol, elbo_tol
        self._elbos: List[float] = []
        self._means: List[torch.Tensor] = []
        self._sds: List[torch.Tensor] = []
        self._previous: Optional[Dict] = None
        self.status = "running"
        #: what the last window comparison measured (``elbo_gain``, ``elbo_se``,
        #: ``moment_change``), for the verdict.
        self.last: Dict[str, float] = {}

    def update(self, elbo: float, mean: torch.Tensor, sd: torch.Tensor) -> str:
        """Add one round; returns ``"running"``, ``"plateau"``, ``"converged"`` or
        ``"diverged"`` (a window's verdict is returned once, on its last round)."""
        # NaN is no ELBO (differential privacy, or a round without enough replies); an
        # infinite one, or non-finite moments, means the fit has left the model's support.
        if not (torch.isfinite(mean).all() and torch.isfinite(sd).all()) or math.isinf(elbo):
            self.status = "diverged"
            return self.status
        self._elbos.append(float(elbo))
        self._means.append(mean.detach().double().reshape(-1))
        self._sds.append(sd.detach().double().reshape(-1))
        if len(self._elbos) < self.window:
            return "running"
        summary = self._summarise()
        self._elbos, self._means, self._sds = [], [], []
        previous, self._previous = self._previous, summary
        if previous is None:
            self.status = "running"
            return self.status
        self.status = self._compare(previous, summary)
        return self.status

    def _summarise(self) -> Dict:
        elbos = torch.tensor(self._elbos, dtype=torch.float64)
        finite = elbos[torch.isfinite(elbos)]
        return {
            "elbo": float(finite.mean()) if len(finite) else math.nan,
            "elbo_var": float(finite.var() / len(finite)) if len(finite) > 1 else math.nan,
            "mean": torch.stack(self._means).mean(0),
            "sd": torch.stack(self._sds).mean(0),
        }

    def _compare(self, before: Dict, after: Dict) -> str:
        scale = torch.maximum(after["sd"], torch.full_like(after["sd"], 1e-12))
        moved = ((after["mean"] - before["mean"]).abs() / scale).max()
        widened = ((after["sd"] - before["sd"]).abs() / scale).max()
        change = float(torch.maximum(moved, widened))
        gain = after["elbo"] - before["elbo"]
        se = math.sqrt(before["elbo_var"] + after["elbo_var"])
        self.last = {"moment_change": change, "elbo_gain": gain, "elbo_se": se}
        if math.isnan(gain):  # no ELBO (differential privacy): the moments alone
            flat = True
        else:
            flat = gain <= 2.0 * se + self.elbo_tol
        if flat and change <= self.moment_tol:
            return "converged"
        return "plateau" if flat else "running"


def q_moments(fit, seed: int):
    """Means and sds of every global value under ``fit``'s q(phi), flattened: from
    :data:`MOMENT_DRAWS` draws made with ``seed`` (the same noise every round, so the
    moments change only when q(phi) does)."""
    with seeded(seed):
        draws = fit.global_samples(MOMENT_DRAWS)
    flat = torch.cat([v.reshape(MOMENT_DRAWS, -1).double() for v in draws.values()], dim=1)
    return flat.mean(0), flat.std(0)


__all__ = [
    "ELBO_TOL",
    "MAX_HALVINGS",
    "MOMENT_DRAWS",
    "MOMENT_TOL",
    "WINDOW",
    "WindowMonitor",
    "q_moments",
]
