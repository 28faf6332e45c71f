"""Server strategies: one base (:class:`ServerStrategy`) and its implementations.

- :class:`~hbfl_pyro.server.Server`: the closed-form and gradient (first-order) modes;
- :class:`SecondOrderServer`: trust-region Newton on the clients' Laplace marginals;
- :class:`FamilyServer`: a closed-form family's update on weighted sums of summaries (the
  deep trainers' server: FedAvg, FedProx and FedHB differ only by its family), and
  :class:`MixtureServer`, its mixture of ``K`` families (the deep mixture's);
- :class:`DifferentialPrivacy`: wraps a first-order server with client-level DP, and
  :class:`FamilyDifferentialPrivacy` a :class:`FamilyServer` (deep FedHB's ``dp=``).
"""

from .base import ServerStrategy
from .closed_form import FamilyServer, MixtureServer
from .dp import DifferentialPrivacy, FamilyDifferentialPrivacy
from .second_order import ConvergenceWarning, SecondOrderServer, trust_region_step

__all__ = [
    "ConvergenceWarning",
    "DifferentialPrivacy",
    "FamilyDifferentialPrivacy",
    "FamilyServer",
    "MixtureServer",
    "SecondOrderServer",
    "ServerStrategy",
    "trust_region_step",
]
