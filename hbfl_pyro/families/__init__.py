"""Closed-form server families (method.md §4)."""

from .base import ClosedFormFamily
from .niw import InverseWishart, NIWDiag, NIWFull, NIWIso
from .normal import NormalNormal

__all__ = ["ClosedFormFamily", "InverseWishart", "NIWDiag", "NIWFull", "NIWIso", "NormalNormal"]
