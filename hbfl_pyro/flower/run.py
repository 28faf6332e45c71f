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

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import AppSpec, flag, load_spec, server_options
from .engine import ResumableRun
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
    checkpoint, fingerprint, resumed = server_checkpoints(spec, fit, engine)
    stop_after = int(spec.config["stop-after-round"])
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
        if checkpoint:
            save_checkpoint(server_state(fit, engine), checkpoint, fingerprint)
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
        if 0 <= stop_after <= fit.round:
            raise _StopRun

    # A resumed run runs only the rounds still missing (the second-order server: the
    # Newton rounds still missing), as `hbfl fit --resume` does.
    rounds = max(0, spec.rounds - fit.round) if resumed else spec.rounds
    stopped = 0 <= stop_after <= fit.round
    if not stopped:
        try:
            fit.run(rounds, progress=False, on_round=after_round)
        except _StopRun:
            stopped = True
    result = run_result(spec, fit, names, nodes, fit.history, engine.traffic, setup)
    if resumed:
        result["resumed_after"] = resumed
    if stopped:  # unfinished: resume it from the checkpoint
        result["stopped_after"] = fit.round
        logger.info("hbfl: the run stops after round %d (stop-after-round)", fit.round)
    result["server_choice"] = dict(fit.server_choice)
    if fit.server.mode == "second_order":
        result["verdict"] = fit.verdict
    if extra is not None:
        result.update(extra(engine))
    return finish_run(grid, spec, fit, nodes, result)


class _StopRun(Exception):
    """Raised after the round ``stop-after-round`` names: the run ends there, unfinished."""


def server_fingerprint(spec: AppSpec, fit) -> Dict:
    """What a ServerApp checkpoint must match to be resumed: the model's
    (:meth:`~hbfl_pyro.FederatedSVI.fingerprint` of the server side), the guide family and
    the options (so a checkpoint resumes only the fit it came from)."""
    return {
        **fit.fingerprint(),
        "engine": "flower",
        "guide": str(spec.config.get("guide", "")),
        "options": {key: _describe(value) for key, value in sorted(spec.options.items())},
    }


def _describe(value) -> str:
    # As `hbfl fit` describes an option in its checkpoints: names for classes and
    # functions, else repr (without an address, which differs from run to run).
    if isinstance(value, type) or callable(value):
        return getattr(value, "__qualname__", None) or type(value).__name__
    text = repr(value)
    return type(value).__name__ if " object at 0x" in text else text


def server_state(fit, engine) -> Dict:
    """The ServerApp's state: round, seed, server, history and traffic (the clients'
    states stay on their nodes, in their ``state-dir``)."""
    return {
        "round": fit.round,
        "seed": fit.seed,
        "server": fit.server.state_dict(),
        "history": [dict(r) for r in fit.history],
        "traffic": [dict(t) for t in engine.traffic],
    }


def server_checkpoints(spec: AppSpec, fit, engine):
    """The run-config keys ``checkpoint`` and ``resume``: checked before the first round,
    and the ``resume`` state loaded into ``fit`` and ``engine``.

    Returns ``(checkpoint path or "", fingerprint or None, the round resumed after or
    0)``. A checkpoint of another model, guide, options or seed is refused with a
    :class:`~hbfl_pyro.checkpoint.CheckpointError` (or ``ValueError``) naming why, before
    any round."""
    config = spec.config
    checkpoint, resume = str(config["checkpoint"]), str(config["resume"])
    if not checkpoint and not resume:
        return "", None, 0
    if checkpoint and not Path(checkpoint).parent.is_dir():
        raise ValueError(f"run config checkpoint={checkpoint!r}: its directory does not exist")
    fingerprint = server_fingerprint(spec, fit)
    if not resume:
        return checkpoint, fingerprint, 0
    if not Path(resume).is_file():
        raise FileNotFoundError(f"run config resume={resume!r}: no such file")
    state = load_checkpoint(resume, fingerprint)
    if state["seed"] != fit.seed:
        raise CheckpointError(
            f"{resume}: the checkpoint's seed {state['seed']} differs from this run's "
            f"{fit.seed}; resume with the options it was written with"
        )
    fit.server.check_state(state["server"])
    fit.round = int(state["round"])
    fit.server.load_state_dict(state["server"])
    fit.history = [dict(r) for r in state["history"]]
    engine.traffic[:] = [dict(t) for t in state.get("traffic", [])]
    if isinstance(engine, ResumableRun):  # it tells the nodes to load their states
        engine.resume_after(fit.round, fit.history)
    logger.info("hbfl: resumed from %s after round %d", resume, fit.round)
    return checkpoint, fingerprint, fit.round


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
        # In a resumed run a client sampled in none of its rounds reads its state-dir.
        resumed = {}
        if "resumed_after" in result:
            resumed["resume-round"] = str(result["resumed_after"])
            resumed["last-rounds"] = json.dumps(getattr(fit.engine, "last_rounds", {}))
        answers, errors = query_nodes(
            grid, list(nodes.values()), "report", timeout, poll, mode=fit.server.mode, **resumed
        )
        for why in errors.values():
            logger.warning("hbfl: a client did not report its local state: %s", why)
        result["clients"] = {a["name"]: a["state"] for a in answers.values()}
    # A second-order run stopped before its PSIS round has no posterior to summarise yet.
    unfinished = "stopped_after" in result and fit.server.mode == "second_order"
    result["global"] = {} if unfinished else global_summary(fit)
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
    "server_checkpoints",
    "server_fingerprint",
    "server_state",
    "finish_run",
    "global_summary",
    "run_result",
    "run_with_engine",
    "write_history",
    "write_result",
]
