"""The ``hbfl`` command line: fit a model file by federated SVI and summarise the posterior.

Usage::

    hbfl fit MODEL_FILE[:NAME] [--rounds R] [--fraction F] [--seed S] [--out DIR] ...
    python -m hbfl_pyro fit MODEL_FILE[:NAME] ...

See :mod:`hbfl_pyro.modelfile` for what a model file defines, and ``hbfl fit --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .cli_parser import (  # noqa: F401 (public here too: hbfl_pyro.cli.build_parser)
    DEFAULT_ROUNDS,
    DESCRIPTION,
    EXIT_STATUS,
    EXIT_UNTRUSTWORTHY,
    build_parser,
)

#: Third-party warnings the command line does not show (issue 16): each concerns a
#: dependency's own API, not the user's model or fit. Narrow on purpose, by category and
#: the warning's module or message; hbfl_pyro's own warnings (ConvergenceWarning,
#: ClientFailureWarning) and any other UserWarning stay visible. Not installed when the user
#: chose warning filters (python -W or PYTHONWARNINGS). The ArviZ 1.x announcement on
#: import is silenced by the package's import itself (hbfl_pyro/__init__.py), which runs
#: before main(); the module filter below also covers an import of ArviZ after it.
THIRD_PARTY_WARNINGS: Tuple[Dict[str, Any], ...] = (
    # ArviZ 0.23's FutureWarnings (its 1.x rewrite).
    {"category": FutureWarning, "module": r"arviz(\.|$)"},
    # torch 2.13 deprecates torch.jit.script, which a dependency still calls on import
    # (attributed to the caller's module, hence matched by message).
    {"category": DeprecationWarning, "message": r"`torch\.jit\.script` is deprecated"},
    # Deprecation notices raised inside torch, Pyro, ArviZ or xarray themselves.
    {"category": DeprecationWarning, "module": r"(torch|pyro|arviz|xarray)(\.|$)"},
    {"category": FutureWarning, "module": r"(torch|pyro|xarray)(\.|$)"},
    # torch's own notice that a future release stops resizing an output tensor, raised
    # from its autograd engine when the second-order server differentiates an indexing
    # model (``b[..., region]``) under vmap: about torch internals, nothing to act on.
    {"category": UserWarning, "message": r"An output with one or more elements was resized"},
    # torch's note that vmap falls back to a loop for an op without a batching rule (e.g.
    # the stick-breaking transform of a simplex local): a speed note for torch's authors.
    {"category": UserWarning, "message": r"There is a performance drop because we have not"},
)


def quiet_third_party_warnings() -> None:
    """Install the :data:`THIRD_PARTY_WARNINGS` filters (unless the user set ``-W`` or
    ``PYTHONWARNINGS``). :func:`main` calls it inside ``warnings.catch_warnings()``, so an
    in-process caller's filters are restored afterwards."""
    if sys.warnoptions:
        return
    for spec in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", **spec)


#: Command-line flag -> FederatedSVI keyword (``rounds`` goes to ``run``).
_SVI_FLAGS = {
    "fraction": "fraction",
    "seed": "seed",
    "local_steps": "local_steps",
    "local_lr": "local_lr",
    "server_lr": "server_lr",
    "lr_decay": "lr_decay",
    "server": "server",
    "num_particles": "num_particles",
    "engine": "engine",
    "on_client_failure": "on_client_failure",
}


class UsageError(ValueError):
    """A user error: reported as one line, without a traceback."""


def _svi_options(args: argparse.Namespace, file_options: Dict[str, Any]) -> Dict[str, Any]:
    """The model file's options, overridden by every flag given on the command line."""
    options = dict(file_options)
    for flag, keyword in _SVI_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            options[keyword] = value
    return options


def _dp_config(args: argparse.Namespace, rounds: int, flower_sim: bool):
    """The :class:`~hbfl_pyro.dp.DPConfig` the --dp-* flags ask for, or ``None``."""
    given = [f for f in ("dp_noise", "dp_epsilon") if getattr(args, f) is not None]
    if args.dp_clip is None:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --dp-clip C")
        return None
    if len(given) != 1:
        raise UsageError("with --dp-clip give exactly one of --dp-noise Z or --dp-epsilon E")
    if flower_sim:
        raise UsageError(
            "differential privacy runs in-process or vectorised here; drop --engine flower-sim"
        )
    from .dp import DPConfig

    try:
        if args.dp_noise is not None:
            return DPConfig(clip=args.dp_clip, noise_multiplier=args.dp_noise, delta=args.dp_delta)
        return DPConfig(
            clip=args.dp_clip, target_epsilon=args.dp_epsilon, rounds=rounds, delta=args.dp_delta
        )
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def fit_command(args: argparse.Namespace, out=None) -> int:
    """Run ``hbfl fit``; returns the exit status. User errors raise :class:`UsageError`."""
    import time

    import pyro
    import torch

    from .data import DataValidationError
    from .guides import GuideError
    from .modelfile import ModelFileError, load_model_file
    from .servers import ConvergenceWarning
    from .structure import ModelStructureError
    from .summary import format_table, posterior_summary, write_csv
    from .svi import FederatedSVI
    from .verdict import verdict_lines

    out = sys.stdout if out is None else out
    if args.pointwise and args.marginal_draws:
        raise UsageError(
            "--pointwise and --marginal-draws exclude each other (the marginal likelihood is "
            "one value per client); give one of them"
        )
    # Before the model file is imported, so that its constants are float64 too.
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    user_errors = (ModelFileError, DataValidationError, ModelStructureError, GuideError)
    try:
        spec = load_model_file(args.model_file, guide=args.guide)
        data = spec.load_data()
        if not isinstance(data, (Mapping, list, tuple)):
            raise ModelFileError(
                f"{spec.path}: load_data() returned {type(data).__name__}; it must return "
                "{client_name: {key: array}}"
            )
    except user_errors as exc:
        raise UsageError(_one_line(exc)) from exc
    given_rounds = args.rounds if args.rounds is not None else spec.rounds
    rounds = DEFAULT_ROUNDS if given_rounds is None else given_rounds
    # Decays the file states over the whole run are spread over the rounds actually run.
    file_options = spec.options_for(rounds)
    options = _svi_options(args, file_options)
    # flower-sim: Flower runs the rounds; this in-process fit receives the result.
    flower_sim = options.get("engine") == "flower-sim"
    dp = _dp_config(args, rounds, flower_sim)
    if dp is not None:
        options["dp"] = dp
    if args.secagg and not flower_sim:
        raise UsageError("--secagg runs in Flower: add --engine flower-sim")
    try:
        svi_options = {**options, "engine": "inprocess"} if flower_sim else options
        fit = FederatedSVI(spec.model, data, **svi_options)
    except user_errors as exc:
        raise UsageError(_one_line(exc)) from exc
    except ValueError as exc:
        # FederatedSVI rejects bad option values (e.g. a fit_options entry) with ValueError;
        # errors of the model's own code arrive wrapped in ModelStructureError.
        raise UsageError(f"{spec.label}: {_one_line(exc)}") from exc

    out_dir = Path(args.out) if args.out is not None else Path("runs") / spec.path.stem
    fingerprint = _checkpoints(fit, args, options, flower_sim, spec.label)
    flower_checkpoints: Dict[str, Any] = {}
    resumed_after = fit.round
    if flower_sim and (args.checkpoint is not None or args.resume is not None):
        flower_checkpoints, resumed_after = _flower_checkpoints(args)
    mode = fit.server.mode
    if fit.family is not None:
        mode += f" ({type(fit.family).__name__})"
    mode += f" ({fit.server_choice['reason']})"
    second_order = fit.server.mode == "second_order"
    if second_order:
        from .svi import MAX_ROUNDS

        cap = MAX_ROUNDS if given_rounds is None else given_rounds
        rounds_text = (
            f"until converged (at most {cap} Newton rounds), then one to three PSIS rounds"
        )
    # A first-order fit in-process runs until its stopping rule holds, unless told how
    # many rounds (DP spends its budget over a fixed number; Flower runs fixed rounds).
    until_converged = not second_order and given_rounds is None and dp is None and not flower_sim
    if until_converged:
        from .svi import MAX_FIRST_ORDER_ROUNDS

        rounds_text = f"until converged (at most {MAX_FIRST_ORDER_ROUNDS})"
    elif not second_order:
        rounds_text = str(rounds)
    header = [
        ("model file", spec.label),
        ("clients", str(len(fit.data))),
        ("sites", _sites_line(fit.structure)),
        ("guide", _guide_line(args, spec, fit)),
        ("server", mode),
        ("rounds", rounds_text),
        ("seed", str(args.seed)),
    ]
    if args.resume is not None:
        header.append(("resumed", f"{args.resume} (after round {resumed_after})"))
    if args.checkpoint is not None:
        header.append(("checkpoint", f"{args.checkpoint} (after every round)"))
    quiet = getattr(args, "quiet", False)
    verbose = getattr(args, "verbose", False)

    def say(text: str) -> None:
        """Print ``text``, unless --quiet (which keeps the verdict and the paths)."""
        if not quiet:
            print(text, file=out)

    width = max(len(k) for k, _ in header)
    for key, value in header:
        say(f"{key.ljust(width)}  {value}")
    out.flush()
    # --quiet and --verbose replace the progress bar (nothing, or one line per round).
    progress = not (args.no_progress or quiet or verbose)
    under_dp = dp is not None

    start = time.perf_counter()
    if flower_sim:
        from .flower import require_flower

        try:
            require_flower()
        except ImportError as exc:
            raise UsageError(str(exc)) from exc
        from .flower.simulation import fit_in_simulation

        run_config = {"secagg": True} if args.secagg else {}
        run_config.update(flower_checkpoints)
        if args.guide is not None:
            run_config["guide"] = args.guide
        try:
            rescaled = {k: file_options[k] for k in spec.decay_over_run}
            fit_in_simulation(
                fit,
                args.model_file,
                _svi_options(args, rescaled),
                cap if second_order else rounds,
                run_config=run_config,
            )
        except ValueError as exc:  # e.g. SecAgg+ with a gradient-mode server
            raise UsageError(f"{spec.label}: {_one_line(exc)}") from exc
        if verbose:  # Flower ran the rounds: their lines once it is done
            for record in fit.history:
                print(_round_line(record, under_dp), file=out)
    else:
        on_round = _checkpoint_writer(fit, args.checkpoint, fingerprint)
        if verbose:
            on_round = _with_round_lines(on_round, out, under_dp)
        # A resumed fit runs only the rounds still missing (its round count goes on).
        if second_order:
            with warnings.catch_warnings():
                # The verdict below says it once, in words, with the banner.
                warnings.simplefilter("ignore", ConvergenceWarning)
                newton_rounds = max(0, cap - fit.round) if fit.round else given_rounds
                fit.run(newton_rounds, progress=progress, on_round=on_round)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # the banner says it
                todo = None if until_converged else max(0, rounds - fit.round)
                fit.run(todo, progress=progress, on_round=on_round)
    timings = {"fit": time.perf_counter() - start}
    verdict_line, banner = verdict_lines(fit.verdict)
    gap = "" if quiet else "\n"
    print(f"{gap}verdict: {verdict_line}", file=out)
    if banner is not None:
        print("\n".join(banner), file=out)
    if fit.privacy is not None:
        p = fit.privacy
        say(
            f"\nprivacy: epsilon {p['epsilon']:.4g} at delta {p['delta']:g} (client level, "
            f"{p['rounds']} rounds, clip {p['clip']:g}, "
            f"noise multiplier {p['noise_multiplier']:.4g}); "
            "no ELBO is released under DP"
        )
    elif second_order:
        say(f"\nELBO estimate (PSIS draws of q): {fit.elbo():.6g}")
    elif fit.history:
        say(f"\nfinal ELBO estimate (round {fit.round}): {fit.history[-1]['elbo']:.6g}")
    start = time.perf_counter()
    rows = posterior_summary(fit, num_samples=args.num_samples, seed=args.seed)
    timings["summary"] = time.perf_counter() - start
    say("\n" + format_table(rows))
    path = write_csv(rows, out_dir / "summary.csv")
    print(f"{gap}wrote {path}", file=out)
    comparison = _compare(fit, args, out_dir, timings, out) if args.compare_pooled else None
    if not args.no_report:
        _write_report(fit, args, out_dir, rows, header, options, timings, out, comparison)
    if getattr(args, "strict", False) and banner is not None:
        what = banner[1].removeprefix("WARNING: ")
        print(
            f"hbfl: --strict: {what} (exit status {EXIT_UNTRUSTWORTHY}; files written)",
            file=sys.stderr,
        )
        return EXIT_UNTRUSTWORTHY
    return 0


def _round_line(record: Dict[str, Any], under_dp: bool = False) -> str:
    """--verbose: one line describing a round's record (no ELBO under DP)."""
    import math

    parts = [f"round {record['round']:>3}"]
    if "phase" in record:
        parts.append(f"{record['phase']:<6}")
    value = record.get("elbo")
    if not under_dp and isinstance(value, (int, float)) and math.isfinite(value):
        parts.append(f"{'objective' if 'phase' in record else 'ELBO'} {value:.6g}")
    parts.append(f"clients {len(record.get('clients', ()))}")
    if record.get("failed"):
        parts.append(f"failed {len(record['failed'])}")
    if "accepted" in record:
        parts.append("step accepted" if record["accepted"] else "step rejected")
    if record.get("radius") is not None:
        parts.append(f"radius {record['radius']:.3g}")
    if record.get("decrement") is not None:
        parts.append(f"decrement {record['decrement']:.3g}")
    if record.get("k_hat") is not None:
        parts.append(f"k-hat {record['k_hat']:.2f}")
    if record.get("seconds") is not None:
        parts.append(f"{record['seconds']:.2f} s")
    return "  ".join(parts)


def _with_round_lines(on_round, out, under_dp: bool):
    """--verbose: ``on_round`` (or nothing) followed by printing the round's line."""

    def callback(record):
        if on_round is not None:
            on_round(record)
        print(_round_line(record, under_dp), file=out)
        out.flush()

    return callback


def _checkpoints(fit, args, options, flower_sim, label) -> Optional[Dict[str, Any]]:
    """--checkpoint / --resume: check them before training, and load the --resume state.

    Returns the fingerprint the checkpoints carry (``None`` without either flag): the
    model's (:meth:`~hbfl_pyro.FederatedSVI.fingerprint`) and this command's options, so a
    checkpoint resumes only the fit it came from."""
    if args.checkpoint is None and args.resume is None:
        return None
    from .checkpoint import CheckpointError, load_checkpoint

    if flower_sim:  # the ServerApp checks and writes them (_flower_checkpoints)
        return None
    if args.checkpoint is not None and not Path(args.checkpoint).parent.is_dir():
        # Found now, not after the first round's work.
        raise UsageError(f"--checkpoint {args.checkpoint}: its directory does not exist")
    fingerprint = {
        **fit.fingerprint(),
        "guide": args.guide,
        "options": {key: _describe(value) for key, value in sorted(options.items())},
    }
    if args.resume is not None:
        try:
            state = load_checkpoint(args.resume, fingerprint)
            fit.load_state_dict(state)
        except FileNotFoundError as exc:
            raise UsageError(f"--resume {args.resume}: no such file") from exc
        except (CheckpointError, ValueError) as exc:
            raise UsageError(f"--resume: {label}: {_one_line(exc)}") from exc
    return fingerprint


def _flower_checkpoints(args) -> Tuple[Dict[str, Any], int]:
    """--checkpoint / --resume with --engine flower-sim: the run-config keys that pass them
    to the Flower apps (``checkpoint``, ``resume``; ``state-dir``, where each node keeps
    its client's state: ``CHECKPOINT.nodes``), and the round the resumed run continues
    after (0 without --resume). The ServerApp refuses a checkpoint of another fit."""
    import shutil

    from .checkpoint import CheckpointError, load_checkpoint

    config: Dict[str, Any] = {}
    after = 0
    if args.checkpoint is not None:
        if not Path(args.checkpoint).parent.is_dir():
            raise UsageError(f"--checkpoint {args.checkpoint}: its directory does not exist")
        config["checkpoint"] = str(Path(args.checkpoint).absolute())
    if args.resume is not None:
        resume = Path(args.resume).absolute()
        try:
            after = int(load_checkpoint(resume)["round"])
        except FileNotFoundError as exc:
            raise UsageError(f"--resume {args.resume}: no such file") from exc
        except (CheckpointError, KeyError, TypeError) as exc:
            raise UsageError(f"--resume: {_one_line(exc)}") from exc
        config["resume"] = str(resume)
    # The nodes' states lie next to the checkpoint; a resumed run writing another
    # checkpoint continues from a copy, so the file resumed from keeps its states.
    if "checkpoint" in config:
        nodes = Path(config["checkpoint"] + ".nodes")
        source = Path(config.get("resume", config["checkpoint"]) + ".nodes")
        if source != nodes and source.is_dir():
            shutil.copytree(source, nodes, dirs_exist_ok=True)
    else:
        nodes = Path(config["resume"] + ".nodes")
    config["state-dir"] = str(nodes)
    return config, after


def _checkpoint_writer(fit, path, fingerprint):
    """--checkpoint: the callback that writes the fit's state after each round, or ``None``."""
    if path is None:
        return None
    from .checkpoint import save_checkpoint

    def write(record):
        save_checkpoint(fit.state_dict(), path, fingerprint)

    return write


def _compare(fit, args, out_dir, timings, out):
    """--compare-pooled: pooled SVI and NUTS, the table on stdout, comparison.csv/.png."""
    import time

    from .compare import compare_pooled

    if args.reference is not None and not Path(args.reference).is_file():
        raise UsageError(f"--reference {args.reference!r}: no such file")
    if args.pooled_steps == 0 and args.nuts_samples == 0 and args.reference is None:
        raise UsageError(
            "--compare-pooled with --pooled-steps 0 and --nuts-samples 0 has nothing to "
            "compare with; give a budget to one of them, or a --reference"
        )
    quiet = getattr(args, "quiet", False)
    if not quiet:
        print("\ncomparing with pooled fits (plain Pyro on the pooled data) ...", file=out)
        out.flush()
    start = time.perf_counter()
    try:
        comparison = compare_pooled(
            fit,
            svi=False
            if args.pooled_steps == 0
            else {
                "steps": args.pooled_steps,
                "lr": args.pooled_lr,
                "num_particles": args.pooled_particles,
            },
            nuts=False
            if args.nuts_samples == 0
            else {
                "warmup": args.nuts_warmup,
                "samples": args.nuts_samples,
                "jit_compile": args.nuts_jit,
            },
            reference=args.reference,
            num_samples=args.num_samples,
            seed=args.seed,
            progress=not (args.no_progress or quiet or getattr(args, "verbose", False)),
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--compare-pooled: {_one_line(exc)}") from exc
    timings["comparison (pooled SVI, NUTS, draws)"] = time.perf_counter() - start
    if not quiet:
        print("\n" + comparison.to_markdown(max_clients=20), file=out)
    paths = [comparison.to_csv(out_dir / "comparison.csv")]
    paths.append(out_dir / "comparison.png")
    comparison.plot_forest(paths[-1])
    for path in paths:
        print(f"wrote {path}", file=out)
    return comparison


def _write_report(fit, args, out_dir, rows, header, options, timings, out, comparison=None):
    """posterior.nc, forest.png, elbo.png and report.md (see :mod:`hbfl_pyro.report`)."""
    import time

    from .export import to_inference_data
    from .report import write_report

    start = time.perf_counter()
    import arviz  # noqa: F401  (timed apart: importing ArviZ takes longer than the export)

    timings["import arviz"] = time.perf_counter() - start
    start = time.perf_counter()
    idata = to_inference_data(
        fit,
        args.num_samples,
        seed=args.seed,
        pointwise=args.pointwise,
        marginal_draws=args.marginal_draws,
    )
    timings["ArviZ export"] = time.perf_counter() - start
    settings = list(header) + [
        ("engine", options.get("engine") or _engine_name(fit)),
        ("posterior draws", f"{args.num_samples} (seed {args.seed}, as summary.csv)"),
        ("log-likelihood", idata.log_likelihood.attrs["log_likelihood"]),
    ]
    settings += [
        (f"option {key}", _describe(value))
        for key, value in sorted(options.items())
        if key not in ("seed", "engine")
    ]
    if getattr(args, "argv", None) is not None:
        settings.append(("command", " ".join(["hbfl"] + list(args.argv))))
    paths = write_report(
        fit,
        out_dir,
        rows,
        idata=idata,
        settings=settings,
        timings=timings,
        comparison=comparison,
    )
    for path in paths.values():
        print(f"wrote {path}", file=out)


def _guide_line(args, spec, fit) -> str:
    """The header's guide: the flag, the model file's own guides, or the server's."""
    if args.guide is not None:
        return args.guide
    if any(key in spec.options for key in ("global_guide", "local_guide")):
        return "the model file's"
    if fit.server.mode == "second_order":
        return "none to choose: Gaussian q over the globals, Laplace factors for the locals"
    return "default (AutoNormal)" if fit.family is None else "the closed-form family's"


def _engine_name(fit) -> str:
    """The engine a fit runs when none was asked for (its server's default)."""
    return "vectorised" if fit.server.mode == "second_order" else "inprocess"


def _describe(value) -> str:
    """A setting's value for the report: names for classes and functions, else repr."""
    if isinstance(value, type) or callable(value):
        return getattr(value, "__qualname__", None) or type(value).__name__
    text = repr(value)
    return type(value).__name__ if " object at 0x" in text else text


def _sites_line(structure) -> str:
    parts = [f"global {', '.join(structure.global_sites) or '-'}"]
    parts.append(f"local {', '.join(structure.local_sites) or '-'}")
    if structure.deterministic_sites:
        parts.append(f"deterministic {', '.join(structure.deterministic_sites)}")
    return "; ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hbfl`` and ``python -m hbfl_pyro``.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :returns: the exit status: 0 on success, 1 on a user error (reported on stderr as
        one line ``hbfl: error: ...``), 2 on bad usage, 3 with ``--strict`` when the
        verdict says the posterior is not trustworthy or not checked, 130 when
        interrupted, 141 when stdout is closed early (a broken pipe); see
        :data:`EXIT_STATUS`. Third-party warnings about the dependencies' own APIs are
        not shown (:data:`THIRD_PARTY_WARNINGS`); the caller's warning filters are
        restored on return.

    Example::

        >>> main(["fit", "models/normal_normal.py", "--rounds", "3", "--no-progress"])
        ... # doctest: +SKIP
        0
    """
    with warnings.catch_warnings():
        quiet_third_party_warnings()
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the report
    try:
        if args.command == "fit":
            return fit_command(args)
        parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    except UsageError as exc:
        print(f"hbfl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hbfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which exited: stop quietly, as Unix tools do.
        # Python flushes stdout again at exit, so point it at devnull first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 0  # pragma: no cover


__all__: List[str] = ["build_parser", "fit_command", "main", "quiet_third_party_warnings"]
