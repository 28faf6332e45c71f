"""Closed-form server families (method.md §4)."""

from .base import ClosedFormFamily
from .inverse_wishart import InverseWishart
from .niw import NIWDiag, NIWFull, NIWIso
from .normal import NormalNormal

__all__ = ["ClosedFormFamily", "InverseWishart", "NIWDiag", "NIWFull", "NIWIso", "NormalNormal"]
