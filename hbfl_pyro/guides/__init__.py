"""The two factors of the guide, ``q(phi)`` (server) and ``q_i(theta_i)`` (client i).

Kept together as Pyro keeps its autoguides in ``pyro.infer.autoguide``:

* :mod:`hbfl_pyro.guides.build`: building, copying and checking the two factors from the
  model (autoguides split by role), and the named guide families
  (:func:`~hbfl_pyro.guides.build.guide_family`);
* :mod:`hbfl_pyro.guides.base`: :class:`~hbfl_pyro.guides.base.ConditionalLocalGuide`, the
  declared base of the local factors conditioned on the globals;
* :mod:`hbfl_pyro.guides.structured`: :class:`~hbfl_pyro.StructuredLocalNormal`, a local
  factor ``q_i(theta_i | phi)`` linear in the unconstrained globals;
* :mod:`hbfl_pyro.guides.laplace`: :class:`~hbfl_pyro.LaplaceLocalNormal`, a local factor
  ``q_i(theta_i | phi)`` from Newton's method on the client's conditional;
* :mod:`hbfl_pyro.guides.spline`: :class:`~hbfl_pyro.AutoSplineMultivariateNormal`, a
  global factor with non-Gaussian marginals.

Every name is importable from here (``from hbfl_pyro.guides import guide_family``).

Example::

    >>> from hbfl_pyro.guides import GUIDE_FAMILIES, guide_family
    >>> guide_family("laplace")["local_guide"] is GUIDE_FAMILIES["laplace"][1]
    True
"""

from .base import ConditionalLocalGuide, builds_itself, is_conditional
from .build import (
    GUIDE_FAMILIES,
    GuideError,
    build_global_guide,
    build_local_guide,
    copy_module,
    guide_family,
    is_autoguide_spec,
    local_moments,
    parameters,
    private_params,
    with_private_state,
)
from .laplace import LaplaceLocalNormal
from .spline import AutoSplineMultivariateNormal
from .structured import StructuredLocalNormal

__all__ = [
    "GUIDE_FAMILIES",
    "AutoSplineMultivariateNormal",
    "ConditionalLocalGuide",
    "GuideError",
    "LaplaceLocalNormal",
    "StructuredLocalNormal",
    "build_global_guide",
    "build_local_guide",
    "builds_itself",
    "copy_module",
    "guide_family",
    "is_conditional",
    "is_autoguide_spec",
    "local_moments",
    "parameters",
    "private_params",
    "with_private_state",
]
