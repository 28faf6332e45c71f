"""Transports between the server and the clients."""

from .inprocess import InProcessEngine
from .vectorised import VectorisedEngine

ENGINES = {"inprocess": InProcessEngine, "vectorised": VectorisedEngine}

__all__ = ["ENGINES", "InProcessEngine", "VectorisedEngine"]
