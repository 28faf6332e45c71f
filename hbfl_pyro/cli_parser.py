"""The ``hbfl`` argument parser: every flag, its help, the exit statuses.

Separate from :mod:`hbfl_pyro.cli` (which runs a command) so that the parser, which the
documentation's CLI reference is generated from, reads on its own.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any, Dict

DESCRIPTION = "Hierarchical Bayesian federated learning (FedHB) in Pyro."

# A list that reads as plain text (--help) and as reStructuredText (docs/cli.rst).
EXIT_STATUS = """\
exit status:

- 0: success
- 1: error: a bad model file, data, option value or checkpoint (one line on stderr,
  "hbfl: error: ...", no traceback)
- 2: usage error: an unknown flag, a missing or malformed argument (argparse's message)
- 3: with --strict only: the fit ran and wrote its files, but its verdict says the
  posterior is not trustworthy or not checked (the banner it prints)
- 130: interrupted (Ctrl-C)
- 141: stdout closed early (a broken pipe, e.g. piped into head)
"""

#: Exit status of ``hbfl fit --strict`` when the verdict's banner is shown.
EXIT_UNTRUSTWORTHY = 3


def _version() -> str:
    """The installed distribution's version (importlib.metadata)."""
    from importlib import metadata

    try:
        return metadata.version("hbfl_pyro")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        from . import __version__

        return __version__


FIT_DESCRIPTION = """\
Fit the model of MODEL_FILE to the clients of its load_data() by federated SVI (in one
process, each client on its own data), print the posterior summary of every site
(mean, sd, 5% and 95% quantiles; local sites per client) and write it to DIR/summary.csv.
It also writes DIR/posterior.nc (the ArviZ InferenceData: posterior draws, replicated
data and each client's log-likelihood, computed on the client), DIR/forest.png,
DIR/elbo.png and DIR/report.md (settings, seeds, versions, timings, the summary table);
--no-report skips these four.

With --compare-pooled the same model is also fitted on the pooled data of all clients with
plain Pyro: SVI with the same guide family (--pooled-* flags) and NUTS (--nuts-* flags,
small budgets by default). The side-by-side table (mean and sd per method and parameter,
z-scores and sd ratios against --reference or else NUTS, federated minus pooled VI, wall
times, ELBOs) goes to DIR/comparison.csv, DIR/report.md and stdout, and a forest plot of
the methods to DIR/comparison.png.

MODEL_FILE is a Python file defining model(data) and load_data(); MODEL_FILE:NAME picks
another model callable of the file (e.g. models/eight_schools.py:centered). Its optional
fit_options dict sets defaults for the options below; a flag given here overrides it.
Computation is in float64.
"""

#: First-order rounds under DP or in Flower when none are given (a fixed budget).
DEFAULT_ROUNDS = 100


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _svi_defaults() -> Dict[str, Any]:
    """FederatedSVI's own keyword defaults, quoted in ``--help`` so they never drift."""
    from .svi import FIRST_ORDER_DEFAULTS, FederatedSVI

    params = inspect.signature(FederatedSVI.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not p.empty}
    # None means "not given": the first-order servers' own defaults apply.
    return {**defaults, **FIRST_ORDER_DEFAULTS, "engine": "inprocess (first-order), vectorised"}


def build_parser() -> argparse.ArgumentParser:
    """The ``hbfl`` argument parser (one sub-command, ``fit``)."""
    from .guides import GUIDE_FAMILIES

    d = _svi_defaults()

    parser = argparse.ArgumentParser(
        prog="hbfl",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print the version of hbfl_pyro and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fit = commands.add_parser(
        "fit",
        help="fit a model file by federated SVI and summarise its posterior",
        description=FIT_DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        help="path of the model file, optionally with :NAME choosing its model (default: model)",
    )
    # Defaults are None: "not given", so the model file's fit_options can fill them in.
    fit.add_argument(
        "--rounds",
        type=_nonnegative_int,
        metavar="R",
        help="rounds to run with a first-order server (default: fit_options['rounds'], else "
        "until its stopping rule holds, at most 500; with DP or Flower "
        f"{DEFAULT_ROUNDS}); with the second-order server, the most Newton rounds before it "
        "stops unconverged (default: until converged, at most 50)",
    )
    fit.add_argument(
        "--fraction",
        type=_fraction,
        metavar="F",
        help=f"fraction of clients sampled each round, in (0, 1] (default: {d['fraction']:g})",
    )
    fit.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the run and of the summary's draws (default: 0)",
    )
    fit.add_argument(
        "--out",
        metavar="DIR",
        help="directory for summary.csv and the report files, created if missing "
        "(default: runs/<model-file-stem>)",
    )
    fit.add_argument(
        "--local-steps",
        type=_positive_int,
        metavar="K",
        help=f"local SVI steps of each sampled client per round (default: {d['local_steps']})",
    )
    fit.add_argument(
        "--local-lr",
        type=_positive_float,
        metavar="LR",
        help=f"Adam step size of the clients' local steps (default: {d['local_lr']:g})",
    )
    fit.add_argument(
        "--server-lr",
        type=_positive_float,
        metavar="LR",
        help=f"Adam step size of the server, gradient mode only (default: {d['server_lr']:g})",
    )
    fit.add_argument(
        "--lr-decay",
        type=_positive_float,
        metavar="G",
        help="per-round multiplicative decay of the server step size, gradient mode only "
        f"(default: {d['lr_decay']:g})",
    )
    fit.add_argument(
        "--guide",
        choices=tuple(GUIDE_FAMILIES),
        help="variational family: mean-field (AutoNormal for q(phi) and each q_i), "
        "structured (q_i(theta_i | phi), StructuredLocalNormal), full-rank / low-rank "
        "(correlated q(phi)), full+struct, laplace (q_i(theta_i | phi) from Newton's method "
        "on the client's conditional, LaplaceLocalNormal), full+laplace or spline+laplace "
        "(a full-rank q(phi) with learned non-Gaussian marginals, "
        "AutoSplineMultivariateNormal); all but "
        "mean-field use the gradient server. "
        "The model file's guide_options[FAMILY] override its fit_options (default: the "
        "file's own guides)",
    )
    fit.add_argument(
        "--server",
        choices=("auto", "second_order", "first_order", "closed_form", "gradient"),
        help="server update: second_order (trust-region Newton on the clients' Laplace "
        "marginals, then a PSIS check; continuous globals and locals), closed_form (a "
        "conjugate family, found automatically), gradient (any model, first-order), or auto: "
        "closed form when possible, else second order when possible, else gradient; any "
        f"first-order option (--local-steps, --server-lr, ...) asks for gradient "
        f"(default: {d['server']})",
    )
    fit.add_argument(
        "--num-particles",
        type=_positive_int,
        metavar="P",
        help=f"Monte Carlo particles per local SVI step (default: {d['num_particles']})",
    )
    fit.add_argument(
        "--num-samples",
        type=_positive_int,
        default=2000,
        metavar="M",
        help="posterior draws behind the summary (default: 2000)",
    )
    fit.add_argument(
        "--engine",
        choices=("inprocess", "vectorised", "flower-sim"),
        help="how simulated clients run: inprocess (one after another, the reference), "
        "vectorised (a round's clients in one batched computation) or flower-sim (Flower's "
        f"simulation engine; needs hbfl_pyro[flower]) (default: {d['engine']})",
    )
    fit.add_argument(
        "--on-client-failure",
        choices=("raise", "drop"),
        help="a client whose replies fail 3 rounds in a row, or never succeed: raise (stop "
        "with an error naming it) or drop (go on without it; the verdict and report name the "
        "clients whose data are not in the posterior; first-order servers only) "
        "(default: raise)",
    )
    fit.add_argument(
        "--pointwise",
        action="store_true",
        help="store one log-likelihood value per observation (and the observed data) in "
        "posterior.nc, instead of one sum per client (in a deployment, each client's choice)",
    )
    fit.add_argument(
        "--marginal-draws",
        type=_nonnegative_int,
        default=0,
        metavar="K",
        help="if K > 0, the log-likelihood in posterior.nc is each client's log p(data | "
        "globals) with its local sites integrated out by K importance draws: the reliable "
        "basis for leave-one-client-out LOO (default: 0, log p(data | locals, globals))",
    )
    fit.add_argument(
        "--no-report",
        action="store_true",
        help="write only summary.csv: no posterior.nc, forest.png, elbo.png or report.md",
    )
    compare = fit.add_argument_group(
        "comparison with pooled fits (plain Pyro on the pooled data; see hbfl_pyro.compare)"
    )
    compare.add_argument(
        "--compare-pooled",
        action="store_true",
        help="also fit the model on the pooled data by Pyro SVI (same guide family) and NUTS, "
        "and write DIR/comparison.csv, DIR/comparison.png and the table in DIR/report.md",
    )
    compare.add_argument(
        "--pooled-steps",
        type=_nonnegative_int,
        default=2000,
        metavar="N",
        help="pooled SVI steps; 0 skips pooled SVI (default: 2000)",
    )
    compare.add_argument(
        "--pooled-lr",
        type=_positive_float,
        default=0.05,
        metavar="LR",
        help="pooled SVI's ClippedAdam step size, decayed 100-fold over the run (default: 0.05)",
    )
    compare.add_argument(
        "--pooled-particles",
        type=_positive_int,
        default=8,
        metavar="P",
        help="Monte Carlo particles per pooled SVI step (default: 8)",
    )
    compare.add_argument(
        "--nuts-warmup",
        type=_nonnegative_int,
        default=300,
        metavar="W",
        help="NUTS warm-up (adaptation) iterations, one chain (default: 300)",
    )
    compare.add_argument(
        "--nuts-samples",
        type=_nonnegative_int,
        default=500,
        metavar="M",
        help="NUTS draws kept after warm-up; 0 skips NUTS (default: 500)",
    )
    compare.add_argument(
        "--nuts-jit",
        action="store_true",
        help="compile NUTS's potential energy with the PyTorch JIT (faster on larger models)",
    )
    compare.add_argument(
        "--reference",
        metavar="JSON",
        help="an external reference posterior summary (a JSON file with 'reference_summary': "
        "{name: {mean, sd}}, as in ../shared/data/reference_posteriors): z-scores and sd "
        "ratios are against it instead of NUTS",
    )
    privacy = fit.add_argument_group(
        "privacy",
        "client-level differential privacy (hbfl_pyro.dp: clients clip their replies, the "
        "server adds Gaussian noise to each round's sum; epsilon is reported) and secure "
        "aggregation (Flower's SecAgg+: closed-form and second-order servers, with --engine "
        "flower-sim)",
    )
    privacy.add_argument(
        "--dp-clip",
        type=_positive_float,
        metavar="C",
        help="turn on differential privacy: the L2 bound of each client's reply",
    )
    privacy.add_argument(
        "--dp-noise",
        type=float,
        metavar="Z",
        help="noise multiplier: the noise on each round's sum has sd Z*C",
    )
    privacy.add_argument(
        "--dp-epsilon",
        type=_positive_float,
        metavar="E",
        help="instead of --dp-noise: the privacy budget of the whole run (Z is solved)",
    )
    privacy.add_argument(
        "--dp-delta",
        type=float,
        default=1e-5,
        metavar="D",
        help="delta of the reported (epsilon, delta) (default: 1e-5)",
    )
    privacy.add_argument(
        "--secagg",
        action="store_true",
        help="with --engine flower-sim: the clients' replies (closed-form summaries, or the "
        "second-order server's Laplace marginals) travel through Flower's SecAgg+ protocol, "
        "so the server sees only their sum",
    )
    fit.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="write the fit's state to PATH after every round (atomically: a kill leaves the "
        "previous checkpoint whole), to continue it later with --resume PATH",
    )
    fit.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the fit from a checkpoint written by --checkpoint, with the same "
        "model file, data, seed and options (refused otherwise); the rounds already run "
        "count towards --rounds",
    )
    fit.add_argument(
        "--no-progress",
        action="store_true",
        help="do not show the progress bar (on stderr)",
    )
    loudness = fit.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the verdict (with its warning banner, if any) and the paths "
        "written, besides errors; no progress bar",
    )
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print one line per round (its objective, clients and the server's "
        "step), in place of the progress bar",
    )
    fit.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {EXIT_UNTRUSTWORTHY} (after writing every file) when the "
        "verdict says the posterior is not trustworthy or not checked: a failed convergence "
        "or PSIS check, or a first-order fit no PSIS check covers (closed form)",
    )
    return parser
