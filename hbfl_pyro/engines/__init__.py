"""Transports between the server and the clients."""

from .base import Engine, Failures, Replies, SecureSum
from .batched_marginal import BatchedMarginalEngine
from .deep import DeepEngine
from .inprocess import InProcessEngine
from .vectorised import VectorisedEngine

ENGINES = {"inprocess": InProcessEngine, "vectorised": VectorisedEngine}
#: The same engine names for the second-order server's clients.
SECOND_ORDER_ENGINES = {"inprocess": InProcessEngine, "vectorised": BatchedMarginalEngine}

__all__ = [
    "BatchedMarginalEngine",
    "DeepEngine",
    "Engine",
    "Failures",
    "Replies",
    "SecureSum",
    "ENGINES",
    "InProcessEngine",
    "SECOND_ORDER_ENGINES",
    "VectorisedEngine",
]
