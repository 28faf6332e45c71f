"""Flower engine: the same model file, fitted across Flower processes.

A model file (see :mod:`hbfl_pyro.modelfile`) becomes a Flower app:

* :func:`server_app` -- a ``ServerApp`` that runs :class:`~hbfl_pyro.FederatedSVI`'s own
  round loop (any server: closed-form, gradient, second-order) with a
  :class:`~hbfl_pyro.flower.engine.FlowerEngine` carrying the messages to the nodes;
* :func:`client_app` -- a ``ClientApp`` that runs :meth:`hbfl_pyro.Client.update` on the
  node's own data, keeping the client's local variational parameters (and its optimiser
  state) in the Flower ``Context`` state between rounds;
* :func:`simulate` -- both in Flower's simulation engine (``hbfl fit --engine flower-sim``);
* :func:`load_result` -- a finished run back into a :class:`~hbfl_pyro.FederatedSVI`.

The deep trainers (:class:`~hbfl_pyro.deep.FedHB` and its FedAvg / FedProx families) run
on Flower too (:mod:`hbfl_pyro.flower.deep`): :func:`deep_server_app` runs the trainer's
own rounds with a :class:`~hbfl_pyro.flower.deep.DeepFlowerEngine`,
:func:`deep_client_app` trains a node's client from its message, :func:`simulate_deep`
runs both in Flower's simulation engine and :func:`load_deep_result` loads the result
into a trainer.

Flower is an optional dependency: ``pip install "hbfl_pyro[flower]"``. Importing this
package does not import Flower; the functions above do, after switching off Flower's and
Ray's network traffic (:mod:`hbfl_pyro.flower.env`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .env import apply_network_hygiene, hygienic_env

INSTALL_HINT = (
    "the Flower engine needs Flower: install it with "
    '`pip install "hbfl_pyro[flower]"` (that is, "flwr[simulation]>=1.42,<2")'
)

_LAZY = {
    "FlowerEngine": "engine",
    "HBFLStrategy": "apps",
    "client_app": "apps",
    "server_app": "apps",
    "RUN_CONFIG_DEFAULTS": "config",
    "simulate": "simulation",
    "load_result": "simulation",
    "DeepFlowerEngine": "deep",
    "deep_client_app": "deep",
    "deep_server_app": "deep",
    "load_deep_result": "deep",
    "simulate_deep": "deep",
}


def require_flower():
    """Apply the network hygiene, then import and return ``flwr``.

    :raises ImportError: with the install command, when Flower is not installed.
    """
    apply_network_hygiene()
    try:
        import flwr
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return flwr


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_flower()
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeepFlowerEngine",
    "FlowerEngine",
    "HBFLStrategy",
    "INSTALL_HINT",
    "RUN_CONFIG_DEFAULTS",
    "apply_network_hygiene",
    "client_app",
    "deep_client_app",
    "deep_server_app",
    "hygienic_env",
    "load_deep_result",
    "load_result",
    "require_flower",
    "server_app",
    "simulate",
    "simulate_deep",
]
