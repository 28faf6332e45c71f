"""A model file fitted in Flower's simulation engine, and its result back in the library.

:func:`simulate` runs :func:`~hbfl_pyro.flower.server_app` and
:func:`~hbfl_pyro.flower.client_app` with ``flwr.simulation.run_simulation``: one virtual
SuperNode per client of the file's ``load_data()`` (node ``i`` holds client ``i``), the
ServerApp in this process, the ClientApps in Ray workers bound to 127.0.0.1.
:func:`load_result` puts the result into a :class:`~hbfl_pyro.FederatedSVI`, so that
summaries, samples and checkpoints work as after an in-process fit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .env import RAY_INIT_ARGS


def _absolute_spec(model_file) -> str:
    """``FILE[:NAME]`` with FILE made absolute (the ClientApps run in other processes)."""
    from ..modelfile import parse_model_spec

    path, name = parse_model_spec(model_file)
    return f"{path.resolve()}:{name}"


def simulate(
    model_file,
    rounds: Optional[int] = None,
    options: Optional[Mapping[str, Any]] = None,
    *,
    num_supernodes: Optional[int] = None,
    collect_local: bool = True,
    num_cpus: Optional[int] = None,
    backend_config: Optional[Dict] = None,
    out_dir=None,
    run_config: Optional[Mapping[str, Any]] = None,
    verbose: bool = False,
) -> Dict:
    """Fit a model file by federated SVI in Flower's simulation engine.

    :param model_file: ``FILE[:NAME]`` of a model file.
    :param rounds: federated rounds (default: the file's ``fit_options["rounds"]``, else
        100; 0 runs none).
    :param options: :class:`~hbfl_pyro.FederatedSVI` keywords overriding the file's; JSON
        values only (numbers, strings, booleans), since every node reads them.
    :param num_supernodes: virtual nodes (default: the number of clients in ``load_data()``).
    :param collect_local: clients send their local state at the end (for
        :func:`load_result` and local-site summaries).
    :param num_cpus: CPUs Ray may use (default: up to 2); each ClientApp worker takes one.
    :param backend_config: Flower's simulation backend config (replaces the default).
    :param out_dir: also write ``result.pt`` and ``history.json`` there.
    :param run_config: further run-config entries
        (:data:`~hbfl_pyro.flower.config.RUN_CONFIG_DEFAULTS`).
    :param verbose: keep Flower's INFO log.
    :returns: the ServerApp's result dict (see :func:`~hbfl_pyro.flower.server_app`).
    """
    from . import require_flower

    require_flower()
    from ..data import FederatedData
    from .apps import client_app, load_spec, server_app

    config = {
        "model-file": _absolute_spec(model_file),
        "options": json.dumps(dict(options or {})),
        "rounds": -1 if rounds is None else int(rounds),
        "collect-local": bool(collect_local),
        "out-dir": str(Path(out_dir).absolute()) if out_dir is not None else "",
    }
    config.update(run_config or {})
    if num_supernodes is None:
        spec = load_spec(config)
        per_client = spec.options.get("per_client", ())
        num_supernodes = len(FederatedData(spec.model_file.load_data(), per_client))
    config["num-clients"] = config.get("num-clients") or num_supernodes
    return run_apps(
        lambda on_result: server_app(config, on_result=on_result),
        client_app(config),
        num_supernodes,
        num_cpus=num_cpus,
        backend_config=backend_config,
        verbose=verbose,
    )


def run_apps(
    make_server_app,
    client_app,
    num_supernodes: int,
    *,
    num_cpus: Optional[int] = None,
    backend_config: Optional[Dict] = None,
    verbose: bool = False,
) -> Dict:
    """Run a ServerApp and a ClientApp in Flower's simulation engine and return the
    result the ServerApp hands to its ``on_result`` (what :func:`simulate` and
    :func:`~hbfl_pyro.flower.deep.simulate_deep` share).

    :param make_server_app: ``make_server_app(on_result)``, the ServerApp.
    :param client_app: the ClientApp.
    :param num_supernodes: virtual nodes.
    :param num_cpus: CPUs Ray may use (default: up to 2); each ClientApp worker takes one.
    :param backend_config: Flower's simulation backend config (replaces the default).
    :param verbose: keep Flower's INFO log.
    :raises RuntimeError: when the ServerApp ended without a result.
    """
    from flwr.simulation import run_simulation

    if backend_config is None:
        cpus = num_cpus or max(1, min(2, os.cpu_count() or 1))
        backend_config = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {**RAY_INIT_ARGS, "num_cpus": cpus, "num_gpus": 0},
        }
    results: List[Dict[str, Any]] = []
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # errors only: not run_simulation's deprecation notice
        flwr_logger.setLevel(logging.ERROR)
    # Ray's notice about a future default; with no GPUs asked for, it changes nothing.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        run_simulation(
            server_app=make_server_app(results.append),
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return results[0]


def load_result(fit, result: Mapping) -> None:
    """Load a Flower run's result into ``fit``, a :class:`~hbfl_pyro.FederatedSVI` built
    from the same model file, data and options.

    With the clients' local states (``collect_local``) the whole state is loaded, as
    :meth:`~hbfl_pyro.FederatedSVI.load_state_dict` does; without them only the server's,
    and the local factors stay at their initial values.
    """
    if sorted(result["names"]) != sorted(fit.clients):
        raise ValueError(
            f"the Flower run's clients {result['names']} differ from this fit's {list(fit.clients)}"
        )
    history = [{k: v for k, v in r.items() if k != "errors"} for r in result["history"]]
    if result.get("clients") and sorted(result["clients"]) == sorted(fit.clients):
        fit.load_state_dict(
            {
                "round": result["round"],
                "seed": result["seed"],
                "server": result["server"],
                "clients": result["clients"],
                "history": history,
            }
        )
        return
    if result["seed"] != fit.seed:
        raise ValueError(f"the Flower run's seed {result['seed']} differs from {fit.seed}")
    fit.server.load_state_dict(result["server"])
    fit.round = result["round"]
    fit.history = history


def fit_in_simulation(fit, model_file, overrides: Mapping[str, Any], rounds: int, **kwargs) -> Dict:
    """Run ``fit``'s rounds in Flower's simulation engine and load the result into it.

    What ``hbfl fit --engine flower-sim`` does: ``fit`` was built from ``model_file`` with
    the file's options and ``overrides`` (the command-line flags); the Flower apps build
    theirs the same way, so ``fit`` ends as an in-process fit with the same seeds would.

    :raises ImportError: with the install command, when Flower is not installed.
    """
    overrides = {k: v for k, v in overrides.items() if k != "engine"}
    result = simulate(model_file, rounds, overrides, collect_local=True, **kwargs)
    load_result(fit, result)
    return result


__all__ = ["fit_in_simulation", "load_result", "simulate"]
