"""Server strategies: one base (:class:`ServerStrategy`) and its implementations.

- :class:`~hbfl_pyro.server.Server`: the closed-form and gradient (first-order) modes.
"""

from .base import ServerStrategy

__all__ = ["ServerStrategy"]
