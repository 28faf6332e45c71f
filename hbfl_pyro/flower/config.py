"""The run config both Flower apps read, and the model file and options it names.

:data:`RUN_CONFIG_DEFAULTS` lists the keys (their meanings: :mod:`hbfl_pyro.flower.apps`;
the ``secagg-*`` keys: :mod:`hbfl_pyro.flower.secagg`); :func:`merged_config` layers the
context's run config and the factory's overrides on them, and :func:`load_spec` imports
the model file they name and derives the :class:`~hbfl_pyro.FederatedSVI` options, the
same on the ServerApp and on every ClientApp. :func:`client_options` and
:func:`server_options` are those options as each side builds its half of the fit.

Example::

    >>> config = merged_config({"rounds": 3}, {"secagg": "true"})
    >>> config["rounds"], flag(config["secagg"]), config["poll-interval"]
    (3, True, 0.05)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

#: Run-config keys of secure aggregation (merged into ``RUN_CONFIG_DEFAULTS``).
SECAGG_CONFIG_DEFAULTS: Dict[str, Any] = {
    # Route the clients' closed-form summaries through SecAgg+ (both apps read it; a
    # ClientApp whose run config sets it refuses plain train messages).
    "secagg": False,
    # Public bound on |every element of a client's summary| (the family's client_summary).
    "secagg-bound": 1000.0,
    # Public bound on |a client's ELBO term|.
    "secagg-elbo-bound": 1.0e6,
    # SecAgg+ neighbourhood size and Shamir threshold (int, or float: a fraction); the
    # defaults are those of Flower's secure-aggregation example.
    "secagg-num-shares": 3,
    "secagg-threshold": 2,
    # Modulus of the masks (a power of 2); Flower's default and documented maximum.
    "secagg-modulus": 2**32,
}

#: Run-config keys read by both apps, with their defaults.
RUN_CONFIG_DEFAULTS: Dict[str, Any] = {
    "model-file": "",
    "options": "{}",
    "rounds": -1,
    "guide": "",
    # Nodes to wait for before the first round (0: every node connected once the
    # count has been stable for a second).
    "num-clients": 0,
    "wait-timeout": 120.0,
    # Seconds a round waits for replies; a node that has not answered by then failed.
    "round-timeout": 600.0,
    "poll-interval": 0.05,
    # Where the ServerApp writes result.pt and history.json ("" : nowhere).
    "out-dir": "",
    # Clients send their local state at the end (for simulation summaries only): the
    # ServerApp asks, and a ClientApp answers only if its own config says so too.
    "collect-local": False,
    # Checkpoint and resume (see docs/flower.rst). The ServerApp writes its state (round,
    # server, history) to ``checkpoint`` after every round ("" : nowhere) and, given
    # ``resume``, continues from that file's state; ``stop-after-round`` ends the run,
    # unfinished, after that round (-1: never), to be resumed later.
    "checkpoint": "",
    "resume": "",
    "stop-after-round": -1,
    # A node-local directory where each ClientApp writes its client's state after each
    # update (a node's own ``state-dir`` node-config entry takes precedence); a resumed
    # run's clients continue from it. The state never leaves the node.
    "state-dir": "",
    # Secure aggregation (closed-form and second-order servers): hbfl_pyro.flower.secagg.
    **SECAGG_CONFIG_DEFAULTS,
}
#: Keywords a node's client ignores: they belong to the server.
_CLIENT_SIDE = {"fraction": 1.0, "min_clients": 1, "engine": "inprocess", "on_message": None}
_SERVER_SIDE = {"engine": "inprocess", "on_message": None}

#: Rounds when neither the run config nor the model file says.
DEFAULT_ROUNDS = 100


def flag(value) -> bool:
    """A run-config boolean (``flwr run`` may give ``"true"``/``"false"`` strings)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclass
class AppSpec:
    """The model file and options both apps derive from the run config."""

    config: Dict[str, Any]
    model_file: Any  # hbfl_pyro.modelfile.ModelFile
    options: Dict[str, Any]
    rounds: int


def merged_config(context_config: Optional[Mapping], overrides: Optional[Mapping]) -> Dict:
    """:data:`RUN_CONFIG_DEFAULTS`, then the context's run config, then ``overrides``."""
    config = dict(RUN_CONFIG_DEFAULTS)
    for source in (context_config or {}), (overrides or {}):
        config.update({k: v for k, v in dict(source).items()})
    return config


_MODEL_FILES: Dict[Tuple[str, float, Optional[str]], Any] = {}


def load_spec(config: Mapping) -> AppSpec:
    """Import the model file named by the run config (cached per process); float64."""
    from ..modelfile import load_model_file, parse_model_spec

    # As `hbfl fit`: before the model file is imported, so its constants are float64.
    torch.set_default_dtype(torch.float64)
    spec = str(config["model-file"])
    if not spec:
        raise ValueError(
            "the run config has no 'model-file': pass --run-config \"model-file='/abs/"
            "path/model.py'\" to flwr run, or run_config={'model-file': ...}"
        )
    path = parse_model_spec(spec)[0]
    guide = str(config.get("guide", "")) or None
    key = (spec, path.stat().st_mtime if path.exists() else 0.0, guide)
    if key not in _MODEL_FILES:
        _MODEL_FILES[key] = load_model_file(spec, guide=guide)
    mf = _MODEL_FILES[key]
    raw = config["options"]
    overrides = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if not isinstance(overrides, dict):
        raise ValueError(f"run config 'options' must be a JSON object, got {raw!r}")
    rounds = int(config["rounds"])
    if rounds < 0:
        rounds = mf.rounds if mf.rounds is not None else DEFAULT_ROUNDS
    # Decays the file states over the whole run are spread over the rounds run here.
    options = mf.options_for(rounds)
    options.update(overrides)
    return AppSpec(dict(config), mf, options, rounds)


def client_options(spec: AppSpec, mode: str) -> Dict[str, Any]:
    """The :class:`~hbfl_pyro.FederatedSVI` keywords a node builds its client with, for
    the server strategy ``mode`` the ServerApp runs: the spec's, less those that belong
    to the server."""
    options = dict(spec.options)
    options.update(_CLIENT_SIDE)
    if mode == "second_order":
        options["server"] = "second_order"
    elif options.get("server", "auto") in ("auto", "second_order"):
        # The ServerApp chose a first-order server (e.g. for an option only it sees).
        options["server"] = "first_order"
    return options


def server_options(spec: AppSpec) -> Dict[str, Any]:
    """The :class:`~hbfl_pyro.FederatedSVI` keywords the ServerApp builds its server with."""
    options = dict(spec.options)
    options.update(_SERVER_SIDE)
    return options


__all__ = [
    "AppSpec",
    "DEFAULT_ROUNDS",
    "RUN_CONFIG_DEFAULTS",
    "SECAGG_CONFIG_DEFAULTS",
    "client_options",
    "flag",
    "load_spec",
    "merged_config",
    "server_options",
]
