"""Transports between the server and the clients."""

from .inprocess import InProcessEngine

__all__ = ["InProcessEngine"]
