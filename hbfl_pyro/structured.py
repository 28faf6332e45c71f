"""Deprecated: moved to :mod:`hbfl_pyro.guides.structured` (issue 16); removed in the next release.

``import hbfl_pyro.structured`` still works for one release and warns (``DeprecationWarning``);
import from ``hbfl_pyro.guides.structured``, or from ``hbfl_pyro.guides``, instead.
"""

import warnings

from .guides.structured import StructuredLocalNormal

__all__ = ["StructuredLocalNormal"]

warnings.warn(
    "hbfl_pyro.structured is deprecated and will be removed in the next release; "
    "import from hbfl_pyro.guides.structured (or hbfl_pyro.guides) instead",
    DeprecationWarning,
    stacklevel=2,
)
