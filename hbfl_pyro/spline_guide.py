"""Deprecated: moved to :mod:`hbfl_pyro.guides.spline` (issue 16); removed in the next release.

``import hbfl_pyro.spline_guide`` still works for one release and warns (``DeprecationWarning``);
import from ``hbfl_pyro.guides.spline``, or from ``hbfl_pyro.guides``, instead.
"""

import warnings

from .guides.spline import AutoSplineMultivariateNormal

__all__ = ["AutoSplineMultivariateNormal"]

warnings.warn(
    "hbfl_pyro.spline_guide is deprecated and will be removed in the next release; "
    "import from hbfl_pyro.guides.spline (or hbfl_pyro.guides) instead",
    DeprecationWarning,
    stacklevel=2,
)
