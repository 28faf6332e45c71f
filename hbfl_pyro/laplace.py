"""Deprecated: moved to :mod:`hbfl_pyro.guides.laplace` (issue 16); removed in the next release.

``import hbfl_pyro.laplace`` still works for one release and warns (``DeprecationWarning``);
import from ``hbfl_pyro.guides.laplace``, or from ``hbfl_pyro.guides``, instead.
"""

import warnings

from .guides.laplace import MAX_LOCAL_SIZE, LaplaceLocalNormal

__all__ = ["MAX_LOCAL_SIZE", "LaplaceLocalNormal"]

warnings.warn(
    "hbfl_pyro.laplace is deprecated and will be removed in the next release; "
    "import from hbfl_pyro.guides.laplace (or hbfl_pyro.guides) instead",
    DeprecationWarning,
    stacklevel=2,
)
