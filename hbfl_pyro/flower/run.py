"""The pieces of a server run that the plain and the SecAgg+ ServerApp share.

:func:`run_with_engine` is a ServerApp's whole run with a given engine (plain Flower
messages or SecAgg+); :func:`build_server` builds the server side of
:class:`~hbfl_pyro.FederatedSVI` from the clients' data schemas; :func:`run_result` is the
run's result dict, :func:`finish_run` its end (the clients' local states when asked, a
summary of ``q(phi)``, the files in ``out-dir``), and :func:`write_result` /
:func:`write_history` write ``result.pt`` and ``history.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .config import AppSpec, flag, load_spec, server_options
from .messaging import discover_clients, logger, query_nodes


def run_with_engine(
    grid,
    config: Mapping,
    make_engine: Callable[[Any, Dict[str, int], Dict[str, Any]], Any],
    extra: Optional[Callable[[Any], Dict]] = None,
) -> Dict:
    """A ServerApp's whole run: discover the clients, build the server side of
    :class:`~hbfl_pyro.FederatedSVI`, give it the engine ``make_engine(fit, nodes,
    run_config)`` (a Flower engine with a ``traffic`` list), run its own rounds
    (:meth:`~hbfl_pyro.FederatedSVI.run`: selection, aggregation, stopping rule, verdict),
    and finish (:func:`finish_run`); ``extra(engine)`` adds entries to the result."""
    spec = load_spec(config)
    start = time.perf_counter()
    names, nodes, schemas = discover_clients(grid, spec.config)
    fit = build_server(spec, names, schemas)
    engine = make_engine(fit, nodes, spec.config)
    fit.engine = engine
    out = str(spec.config["out-dir"])
    logger.info(
        "hbfl: %d clients on nodes %s; %s server through %s, %d rounds at most",
        len(names),
        nodes,
        fit.server.mode,
        type(engine).__name__,
        spec.rounds,
    )
    setup = time.perf_counter() - start

    def after_round(record: Dict) -> None:
        if out:  # progress, for whoever watches a deployment
            so_far = run_result(spec, fit, names, nodes, fit.history, engine.traffic, setup)
            write_history(so_far, out)
        logger.info(
            "hbfl round %d: objective %.6g, clients %s, failed %s",
            record["round"],
            record["elbo"],
            record["clients"],
            record["failed"],
        )

    fit.run(spec.rounds, progress=False, on_round=after_round)
    result = run_result(spec, fit, names, nodes, fit.history, engine.traffic, setup)
    result["server_choice"] = dict(fit.server_choice)
    if fit.server.mode == "second_order":
        result["verdict"] = fit.verdict
    if extra is not None:
        result.update(extra(engine))
    return finish_run(grid, spec, fit, nodes, result)


def build_server(spec: AppSpec, names: List[str], schemas: Dict[str, Dict]):
    """The server side of :class:`~hbfl_pyro.FederatedSVI` from the clients' schemas.

    Returns a ``FederatedSVI`` whose clients hold the schemas (ones), never trained: only
    its ``server``, ``structure`` and ``family`` are used.
    """
    from ..svi import FederatedSVI

    options = server_options(spec)
    return FederatedSVI(spec.model_file.model, {n: schemas[n] for n in names}, **options)


def finish_run(grid, spec: AppSpec, fit, nodes: Dict[str, int], result: Dict) -> Dict:
    """The end of a server run (plain or SecAgg+): collect the clients' local states when
    the run config asks (``collect-local``), summarise ``q(phi)``, write ``out-dir``."""
    config = spec.config
    if flag(config["collect-local"]):
        timeout, poll = float(config["round-timeout"]), float(config["poll-interval"])
        answers, errors = query_nodes(
            grid, list(nodes.values()), "report", timeout, poll, mode=fit.server.mode
        )
        for why in errors.values():
            logger.warning("hbfl: a client did not report its local state: %s", why)
        result["clients"] = {a["name"]: a["state"] for a in answers.values()}
    result["global"] = global_summary(fit)
    out = str(config["out-dir"])
    if out:
        write_result(result, out)
    return result


def run_result(spec, fit, names, nodes, history, traffic, setup) -> Dict:
    """The result dict of a server run so far (see :func:`~hbfl_pyro.flower.server_app`):
    ``history`` holds a record a round, ``traffic`` each round's message sizes."""
    return {
        "round": len(history),
        "seed": fit.seed,
        "model_file": str(spec.config["model-file"]),
        "names": names,
        "nodes": nodes,
        "server": fit.server.state_dict(),
        "history": history,
        "traffic": traffic,
        "setup_seconds": setup,
        "clients": {},
        "global": {},
    }


def global_summary(fit) -> Dict[str, Dict[str, float]]:
    """Mean and sd of each scalar global element, from 4000 seeded draws of ``q(phi)``."""
    from ..seeding import derive_seed, seeded

    with seeded(derive_seed(fit.seed, "flower-summary")), torch.no_grad():
        draws = fit.global_samples(4000)
    out = {}
    for site, value in draws.items():
        flat = value.reshape(value.shape[0], -1)
        for j in range(flat.shape[1]):
            key = site if flat.shape[1] == 1 else f"{site}[{j}]"
            out[key] = {"mean": float(flat[:, j].mean()), "sd": float(flat[:, j].std())}
    return out


def write_result(result: Dict, out_dir) -> Path:
    """Write ``result.pt`` (``torch.save``) and ``history.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / "result.pt")
    write_history(result, out)
    return out / "result.pt"


def write_history(result: Dict, out_dir) -> None:
    """``history.json``: rounds, failures, traffic and the global summary (no tensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("round", "seed", "model_file", "names", "nodes", "history", "traffic", "global")
    text = json.dumps({k: result[k] for k in keys}, indent=1, default=str)
    tmp = out / "history.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "history.json")


__all__ = [
    "build_server",
    "finish_run",
    "global_summary",
    "run_result",
    "run_with_engine",
    "write_history",
    "write_result",
]
