"""The ``hbfl`` command line, model-file loading, and posterior summaries."""

import csv
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

from hbfl_pyro import ClientFailureWarning, ConvergenceWarning, FederatedSVI
from hbfl_pyro.cli import EXIT_UNTRUSTWORTHY, build_parser, main, quiet_third_party_warnings
from hbfl_pyro.modelfile import ModelFileError, load_model_file, parse_model_spec
from hbfl_pyro.summary import (
    COLUMNS,
    deterministic_samples,
    format_number,
    format_table,
    posterior_summary,
    write_csv,
)

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--rounds",
    "--fraction",
    "--seed",
    "--out",
    "--local-steps",
    "--local-lr",
    "--server-lr",
    "--lr-decay",
    "--guide",
    "--server",
    "--num-particles",
    "--num-samples",
    "--engine",
    "--on-client-failure",
    "--pointwise",
    "--marginal-draws",
    "--no-report",
    "--checkpoint",
    "--resume",
    "--no-progress",
    "--compare-pooled",
    "--pooled-steps",
    "--pooled-lr",
    "--pooled-particles",
    "--nuts-warmup",
    "--nuts-samples",
    "--nuts-jit",
    "--reference",
    "--dp-clip",
    "--dp-noise",
    "--dp-epsilon",
    "--dp-delta",
    "--secagg",
    "-q",
    "--quiet",
    "-v",
    "--verbose",
    "--strict",
]
REPORT_FILES = ("posterior.nc", "forest.png", "elbo.png", "report.md")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A model with a vector global, a vector local, its clients plate at dim=-2, ragged
# clients, and deterministic sites of every kind: global, per client with and without
# event_dim, and per observation.
VECTOR_MODEL = """
import pyro, pyro.distributions as dist, torch
from pyro import poutine
from hbfl_pyro import num_clients

def model(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 5.0).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    pyro.deterministic("tau2", tau**2)
    y, mask = data["y"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, tau.unsqueeze(-1)).to_event(1))
        s = pyro.deterministic("s", theta.sum(-1))
        pyro.deterministic("v", 2 * theta, event_dim=1)
        with pyro.plate("obs", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.deterministic("m", s + 0.0 * y)
            pyro.sample("y", dist.Normal(s, 1.0), obs=y)

def load_data():
    g = torch.Generator().manual_seed(0)
    return {f"c{i}": {"y": torch.randn(i + 2, generator=g) + i} for i in range(3)}

fit_options = {"rounds": 2, "local_steps": 1, "server": "gradient"}
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def _run(command):
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _check_report_files(out, clients, engine="inprocess"):
    """posterior.nc opens with ArviZ and agrees with summary.csv; the PNGs are PNGs; the
    report has the settings and the summary table."""
    idata = az.from_netcdf(str(out / "posterior.nc"))
    try:
        assert {"posterior", "posterior_predictive", "log_likelihood", "elbo_history"} <= set(
            idata.groups()
        )
        assert list(idata.posterior["client"].values) == clients
        assert idata.log_likelihood["y"].dims == ("chain", "draw", "client")
        _, rows = _read_csv(out / "summary.csv")
        # The same draws as the summary (same --seed and --num-samples).
        mu_mean = float(idata.posterior["mu"].mean())
        assert mu_mean == pytest.approx(float(next(r for r in rows if r[0] == "mu")[3]))
    finally:
        idata.close()
    for name in ("forest.png", "elbo.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    assert "| site | client | index | mean | sd | q5 | q95 |" in report
    for client in clients:
        assert f"| theta | {client} |" in report, client
    assert f"| engine | {engine} |" in report and "| arviz |" in report
    assert "| fit |" in report  # timings


def _hbfl_script():
    script = Path(sys.executable).parent / ("hbfl.exe" if sys.platform == "win32" else "hbfl")
    if script.exists():
        return str(script)
    found = shutil.which("hbfl")
    if found is None:
        pytest.skip("the `hbfl` console script is not installed (pip install -e .)")
    return found


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_module_entry_point_normal_normal(tmp_path):
    out = tmp_path / "nn"
    cmd = [sys.executable, "-m", "hbfl_pyro", "fit", "models/normal_normal.py"]
    result = _run(cmd + ["--rounds", "3", "--local-steps", "5", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    names = [f"client{i:02d}" for i in range(10)]
    assert "closed_form" in result.stdout and "clients     10" in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.split()[:1] == ["mu"] for line in lines)
    for name in names:
        assert any(line.split()[:2] == ["theta", name] for line in lines), name
    header, rows = _read_csv(out / "summary.csv")
    assert header == list(COLUMNS)
    # mu is a scalar; theta (shape (C, 1) in the model) one scalar per client.
    assert [r[:3] for r in rows] == [["mu", "", ""]] + [["theta", n, ""] for n in names]
    _check_report_files(out, names)
    assert f"wrote {out / 'report.md'}" in result.stdout


@pytest.mark.slow
def test_console_script_eight_schools_centered(tmp_path):
    out = tmp_path / "es"
    cmd = [_hbfl_script(), "fit", "models/eight_schools.py:centered", "--rounds", "3"]
    result = _run(cmd + ["--local-steps", "1", "--out", str(out), "--no-report"])
    assert result.returncode == 0, result.stderr
    schools = list("ABCDEFGH")
    lines = [line.split() for line in result.stdout.splitlines()]
    assert "eight_schools.py:centered" in result.stdout and "gradient" in result.stdout
    assert any(words[:1] == ["mu"] for words in lines)
    assert any(words[:1] == ["tau"] for words in lines)
    for school in schools:
        assert any(words[:2] == ["theta", school] for words in lines), school
    header, rows = _read_csv(out / "summary.csv")
    assert header == list(COLUMNS)
    expected = [["mu", "", ""], ["tau", "", ""]] + [["theta", s, ""] for s in schools]
    assert [r[:3] for r in rows] == expected
    assert all(float(r[5]) <= float(r[3]) <= float(r[6]) for r in rows)  # q5 <= mean <= q95
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # --no-report


@pytest.mark.slow
def test_engine_and_pointwise_flags(tmp_path, capsys):
    out = tmp_path / "es"
    argv = ["fit", "models/eight_schools.py", "--rounds", "2", "--local-steps", "1"]
    argv += ["--engine", "vectorised", "--pointwise", "--num-samples", "200", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _check_report_files(out, list("ABCDEFGH"), engine="vectorised")
    idata = az.from_netcdf(str(out / "posterior.nc"))
    try:
        assert "observed_data" in idata.groups()  # --pointwise: the clients' opt-in
        np.testing.assert_array_equal(idata.observed_data["y"], [28, 8, -3, 7, -1, 1, 18, 12])
        assert idata.posterior.sizes["draw"] == 200
    finally:
        idata.close()
    assert "| command | hbfl fit models/eight_schools.py" in (out / "report.md").read_text()


@pytest.mark.slow
def test_bad_model_path_is_one_line_error_subprocess(tmp_path):
    cmd = [sys.executable, "-m", "hbfl_pyro", "fit", "models/no_such_model.py"]
    result = _run(cmd)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "hbfl: error: model file 'models/no_such_model.py' not found"
    ]
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag
    # Every option of the parser is in the list above (and so documented in the README).
    fit_parser = build_parser()._subparsers._group_actions[0].choices["fit"]
    options = {s for a in fit_parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert options == set(FLAGS)
    assert all(a.help for a in fit_parser._actions)


@pytest.mark.parametrize(
    "text, message",
    [
        ("def load_data():\n    return {}\n", "defines no 'model'"),
        ("def model(data):\n    pass\n", "defines no `load_data()`"),
        (
            VECTOR_MODEL.replace("def load_data():", "def load_data():\n    return None\n"),
            "load_data() returned NoneType",
        ),
        (
            VECTOR_MODEL.replace("+ i} for i", "* float('nan')} for i"),
            "client 'c0', key 'y'",
        ),
        (VECTOR_MODEL.replace('"rounds": 2', '"round": 2'), "unknown fit_options ['round']"),
    ],
)
def test_user_errors_exit_nonzero_with_one_line(tmp_path, capsys, text, message):
    path = _write(tmp_path, "bad.py", text)
    assert main(["fit", str(path), "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hbfl: error: ")
    assert message in err


def test_pointwise_and_marginal_draws_exclude_each_other(tmp_path, capsys):
    path = _write(tmp_path, "vec.py", VECTOR_MODEL)
    argv = ["fit", str(path), "--pointwise", "--marginal-draws", "5", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exclude each other" in err
    assert not (tmp_path / "summary.csv").exists()  # refused before fitting


def test_flags_override_fit_options(tmp_path, capsys):
    path = _write(tmp_path, "vec.py", VECTOR_MODEL)
    argv = ["fit", str(path), "--rounds", "1", "--seed", "3", "--no-progress"]
    argv += ["--marginal-draws", "5"]
    assert main(argv + ["--num-samples", "50", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "rounds      1" in out and "seed        3" in out
    assert "deterministic tau2, s, v, m" in out
    header, rows = _read_csv(tmp_path / "o" / "summary.csv")
    # mu[2] + tau + theta 3x[2] + tau2 + s 3x1 + v 3x[2] + m (2 + 3 + 4 observations)
    assert len(rows) == 2 + 1 + 6 + 1 + 3 + 6 + 9
    idata = az.from_netcdf(str(tmp_path / "o" / "posterior.nc"))
    try:
        # --marginal-draws: one log p(data_i | globals) per client and draw.
        assert list(idata.log_likelihood.data_vars) == ["marginal"]
        assert idata.log_likelihood["marginal"].shape == (1, 50, 3)
        # The per-observation deterministic m: one flat dim over the ragged clients.
        assert list(idata.posterior["m_client"].values) == ["c0"] * 2 + ["c1"] * 3 + ["c2"] * 4
    finally:
        idata.close()


# ---------------------------------------------------------------------------- summaries
@pytest.fixture
def eight_schools_fit():
    spec = load_model_file(ROOT / "models" / "eight_schools.py")  # non-centered
    return FederatedSVI(spec.model, spec.load_data(), local_steps=1)


def test_summary_rows_global_local_and_deterministic(eight_schools_fit):
    fit = eight_schools_fit
    fit.run(2, progress=False)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    rows = posterior_summary(fit, num_samples=400, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    assert rows == posterior_summary(fit, num_samples=400, seed=7)  # reproducible
    assert all(set(r) == set(COLUMNS) for r in rows)
    schools = fit.data.names
    assert [(r["site"], r["client"], r["index"]) for r in rows] == (
        [("mu", "", ""), ("tau", "", "")]
        + [("theta_trans", s, "") for s in schools]
        + [("theta", s, "") for s in schools]
    )
    # theta = mu + tau * theta_trans, recomputed from the same draws.
    with torch.random.fork_rng():
        torch.manual_seed(7)
        g, loc = fit.global_samples(400), fit.local_samples(400)
    theta = g["mu"][:, None] + g["tau"][:, None] * loc["theta_trans"]
    by_key = {(r["site"], r["client"]): r for r in rows}
    for i, school in enumerate(schools):
        row = by_key[("theta", school)]
        assert row["mean"] == pytest.approx(float(theta[:, i].mean()))
        assert row["sd"] == pytest.approx(float(theta[:, i].std()))
        assert row["q5"] < row["mean"] < row["q95"]


def test_deterministic_samples_shapes_and_values(tmp_path):
    spec = load_model_file(_write(tmp_path, "vec.py", VECTOR_MODEL))
    fit = FederatedSVI(spec.model, spec.load_data(), **spec.options)
    g, loc = fit.global_samples(5), fit.local_samples(5)
    assert loc["theta"].shape == (5, 3, 1, 2)
    batches = {name: c._batch for name, c in fit.clients.items()}
    det = deterministic_samples(fit.model, batches, g, loc, fit.structure)
    assert list(det) == ["tau2", "s", "v", "m"]
    assert list(det["tau2"]) == [""]  # outside the clients plate: one value, no client
    assert torch.allclose(det["tau2"][""], g["tau"] ** 2)
    for i, name in enumerate(fit.data.names):
        theta = loc["theta"][:, i].reshape(5, 2)
        assert torch.allclose(det["s"][name], theta.sum(-1))
        assert torch.allclose(det["v"][name], 2 * theta)
        assert det["m"][name].shape == (5, i + 2)  # each client's own observations
    rows = posterior_summary(fit, num_samples=50)
    keys = [(r["site"], r["client"], r["index"]) for r in rows]
    assert keys[:3] == [("mu", "", "[0]"), ("mu", "", "[1]"), ("tau", "", "")]
    assert ("theta", "c2", "[1]") in keys and ("v", "c0", "[1]") in keys
    assert ("s", "c1", "") in keys and ("m", "c2", "[3]") in keys


def test_write_csv_and_format_table(tmp_path, eight_schools_fit):
    rows = posterior_summary(eight_schools_fit, num_samples=100)
    path = write_csv(rows, tmp_path / "new" / "summary.csv")
    header, body = _read_csv(path)
    assert header == list(COLUMNS) and len(body) == len(rows)
    assert float(body[0][3]) == rows[0]["mean"]  # full precision
    lines = format_table(rows).splitlines()
    assert lines[0].split() == list(COLUMNS) and len(lines) == len(rows) + 1
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned last column
    assert [format_number(x) for x in (4.3789, 0.012345, 1234.5, -0.5, 0.0, 2.5e-7)] == [
        "4.38",
        "0.0123",
        "1234",
        "-0.500",
        "0",
        "2.50e-07",
    ]


# ---------------------------------------------------------------------------- model files
def test_parse_model_spec():
    assert parse_model_spec("models/eight_schools.py:centered") == (
        Path("models/eight_schools.py"),
        "centered",
    )
    assert parse_model_spec("models/normal_normal.py") == (Path("models/normal_normal.py"), "model")
    assert parse_model_spec("C:\\models\\m.py") == (Path("C:\\models\\m.py"), "model")


def test_load_model_file_options_and_sys_path(tmp_path):
    _write(tmp_path, "helper_for_hbfl_test.py", "SCALE = 2.0\n")
    text = VECTOR_MODEL + "from helper_for_hbfl_test import SCALE\nper_client = []\n"
    before = list(sys.path)
    spec = load_model_file(f"{_write(tmp_path, 'vec.py', text)}:model")
    assert sys.path == before  # the file's directory was on sys.path only while importing
    assert spec.module.SCALE == 2.0 and spec.attribute == "model" and spec.rounds == 2
    assert spec.options == {"per_client": (), "local_steps": 1, "server": "gradient"}
    centered = load_model_file("models/eight_schools.py:centered")
    assert centered.model.__name__ == "centered"
    # No fit_options: `hbfl fit` runs the library's defaults (second order, until converged).
    assert centered.rounds is None and centered.options == {}
    assert centered.label == "models/eight_schools.py:centered"


def test_model_file_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ModelFileError, match="'nowhere.py' not found"):
        load_model_file("nowhere.py")
    with pytest.raises(ModelFileError, match="is not a file"):
        load_model_file(tmp_path)
    path = _write(tmp_path, "m.py", "def load_data():\n    return {}\ndef other(data): pass\n")
    with pytest.raises(ModelFileError, match=r"m\.py defines no 'model'.*functions.*: other"):
        load_model_file(path)
    with pytest.raises(ModelFileError, match=r"defines no 'centred'"):
        load_model_file(f"{path}:centred")
    path = _write(tmp_path, "n.py", "model = 3\ndef load_data(): return {}\n")
    with pytest.raises(ModelFileError, match="not a callable Pyro model"):
        load_model_file(path)
    path = _write(tmp_path, "o.py", "def model(data): pass\n")
    with pytest.raises(ModelFileError, match=r"o\.py defines no `load_data\(\)`: add"):
        load_model_file(path)
    path = _write(tmp_path, "p.py", "def model(d): pass\ndef load_data(): pass\nfit_options = 1\n")
    with pytest.raises(ModelFileError, match="fit_options must be a dict"):
        load_model_file(path)


@pytest.mark.slow
def test_dp_flags_report_epsilon(tmp_path, capsys):
    """--dp-clip/--dp-noise fit with client-level DP and print the run's epsilon, which
    equals the accountant's for the rounds run (3 noisy releases)."""
    from hbfl_pyro.dp import DPConfig

    argv = ["fit", "models/normal_normal.py", "--rounds", "3", "--no-progress", "--no-report"]
    argv += ["--dp-clip", "10", "--dp-noise", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = DPConfig(clip=10.0, noise_multiplier=2.0).epsilon(3)
    assert f"privacy: epsilon {expected:.4g} at delta 1e-05" in out
    assert "final ELBO estimate" not in out  # no ELBO is released under DP


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dp-noise", "1"], "--dp-noise needs --dp-clip C"),
        (["--dp-clip", "1"], "exactly one of --dp-noise Z or --dp-epsilon E"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "1"], "exactly one of"),
        (["--secagg"], "--secagg runs in Flower: add --engine flower-sim"),
        (["--dp-clip", "1", "--dp-noise", "1", "--engine", "flower-sim"], "drop --engine"),
    ],
)
def test_privacy_flag_errors(tmp_path, capsys, flags, message):
    argv = ["fit", "models/normal_normal.py", "--rounds", "1", "--no-progress", "--no-report"]
    assert main(argv + flags + ["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_decays_stated_over_the_run_follow_the_rounds_run(tmp_path):
    """``*_over_run`` decays are spread over the rounds actually run: the file's default
    rounds, or ``hbfl fit --rounds`` (the step size falls by the stated total either way)."""
    from hbfl_pyro.modelfile import fit_settings

    text = VECTOR_MODEL.replace(
        '"rounds": 2,', '"rounds": 4, "lr_decay_over_run": 0.01, "local_lr_decay_over_run": 0.5,'
    )
    spec = load_model_file(_write(tmp_path, "decay.py", text))
    assert spec.decay_over_run == {"lr_decay": 0.01, "local_lr_decay": 0.5}
    assert spec.options["lr_decay"] == pytest.approx(0.01 ** (1 / 4), rel=1e-15)
    assert spec.options_for(10)["local_lr_decay"] == pytest.approx(0.5 ** (1 / 10), rel=1e-15)
    assert fit_settings(spec.module.fit_options, 2)[0]["lr_decay"] == pytest.approx(0.1)
    # Through the command line: 2 rounds instead of the file's 4.
    out = tmp_path / "run"
    assert main(["fit", str(spec.path), "--rounds", "2", "--no-progress", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| option lr_decay | 0.1 |" in report  # 0.01 over 2 rounds
    assert f"| option local_lr_decay | {0.5**0.5!r} |" in report
    bad = VECTOR_MODEL.replace(
        '"rounds": 2,', '"rounds": 2, "lr_decay": 0.9, "lr_decay_over_run": 0.1,'
    )
    with pytest.raises(ModelFileError, match="both 'lr_decay_over_run' and 'lr_decay'"):
        load_model_file(_write(tmp_path, "bad.py", bad))


def test_guide_family_uses_the_files_guide_options(tmp_path, capsys):
    """``--guide FAMILY`` / ``load_model_file(..., guide=)``: the family's guides, the
    gradient server, and the file's ``guide_options[FAMILY]`` over its ``fit_options``
    (a decay over the run there replaces a per-round one of ``fit_options``)."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    from hbfl_pyro import StructuredLocalNormal

    text = VECTOR_MODEL.replace(
        '"rounds": 2, "local_steps": 1, "server": "gradient"}',
        '"rounds": 2, "local_steps": 1, "lr_decay": 0.9}\n'
        'guide_options = {"structured": {"rounds": 3, "lr_decay_over_run": 0.001},\n'
        '                 "low-rank": {"lr_decay_over_run": 0.01}}',
    )
    path = _write(tmp_path, "families.py", text)
    plain = load_model_file(path)
    assert plain.rounds == 2 and "local_guide" not in plain.options
    structured = load_model_file(path, guide="structured")
    assert structured.guide == "structured" and structured.rounds == 3
    assert structured.options["local_guide"] is StructuredLocalNormal
    assert structured.options["server"] == "gradient"
    assert structured.options["local_steps"] == 1  # kept from fit_options
    assert structured.options["lr_decay"] == pytest.approx(0.1, rel=1e-12)  # 0.001 ** (1/3)
    full_rank = load_model_file(path, guide="full-rank")  # no guide_options: fit_options
    assert full_rank.rounds == 2 and full_rank.options["lr_decay"] == 0.9
    assert full_rank.options["global_guide"].func is AutoMultivariateNormal  # a partial
    # "mean-field" is the library default: a conjugate model fitted with first-order
    # options (normal_normal.py's fit_options) keeps its closed-form server.
    normal = load_model_file(ROOT / "models" / "normal_normal.py", guide="mean-field")
    assert normal.options["global_guide"] == "auto"
    fit = FederatedSVI(normal.model, normal.load_data(), **normal.options)
    assert fit.server.mode == "closed_form"
    with pytest.raises(ModelFileError, match="unknown guide family 'flow'"):
        load_model_file(path, guide="flow")
    low_rank = load_model_file(path, guide="low-rank")  # a decay over fit_options' 2 rounds
    assert low_rank.rounds == 2 and low_rank.options["lr_decay"] == pytest.approx(0.1)
    bad = text.replace('{"rounds": 3,', '{"round": 3,')
    with pytest.raises(ModelFileError, match=r"unknown guide_options\['structured'\]"):
        load_model_file(_write(tmp_path, "bad.py", bad), guide="structured")
    # The command line runs the family's settings and says so.
    out = tmp_path / "run"
    argv = ["fit", str(path), "--guide", "structured", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "guide" in printed and "structured" in printed
    report = (out / "report.md").read_text()
    assert "| rounds | 3 |" in report
    assert "StructuredLocalNormal" in report


# ---------------------------------------------------------------- a quiet, conventional CLI
def _fresh_env(tmp_path):
    """The environment of a subprocess whose ArviZ has not warned today (its once-a-day
    stamp lives in the user cache directory) and with no user warning filters."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def test_version_from_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hbfl {metadata.version('hbfl_pyro')}"


@pytest.mark.slow
def test_import_prints_no_arviz_future_warning(tmp_path):
    # Without the package's scoped filter, importing it prints ArviZ's FutureWarning
    # (once a day, on a fresh cache directory, as here).
    result = subprocess.run(
        [sys.executable, "-m", "hbfl_pyro", "--version"],
        cwd=ROOT,
        env=_fresh_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("hbfl ")
    assert result.stderr == ""


def test_help_documents_the_exit_status(capsys):
    for argv in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "exit status:" in text
        for code in ("0", "1", "2", str(EXIT_UNTRUSTWORTHY), "130", "141"):
            assert f"\n- {code}: " in text, code


def test_third_party_warning_filters_are_narrow(monkeypatch):
    """Dependencies' API notices are filtered by category and module or message; the
    library's own warnings, and a UserWarning of Pyro, still show."""
    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_warnings()

        def emit(message, category, module):
            warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)

        emit("ArviZ is undergoing a major refactor", FutureWarning, "arviz")
        emit("`torch.jit.script` is deprecated. Please switch", DeprecationWarning, "some_dep")
        emit("old API", DeprecationWarning, "pyro.infer.svi")
        emit("old API", FutureWarning, "torch.nn.modules")
        assert caught == []
        emit("not converged", ConvergenceWarning, "hbfl_pyro.servers.second_order")
        emit("client failed", ClientFailureWarning, "hbfl_pyro.server")
        emit("Found plate statements in guide but not model", UserWarning, "pyro.util")
        emit("a deprecation of the user's own", DeprecationWarning, "arvizzz_fork")
    assert [w.category for w in caught] == [
        ConvergenceWarning,
        ClientFailureWarning,
        UserWarning,
        DeprecationWarning,
    ]
    # python -W / PYTHONWARNINGS: the user's choice, nothing installed.
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    before = list(warnings.filters)
    quiet_third_party_warnings()
    assert warnings.filters == before


def test_main_restores_the_callers_warning_filters(tmp_path, capsys):
    before = list(warnings.filters)
    assert main(["fit", str(tmp_path / "missing.py"), "--out", str(tmp_path)]) == 1
    assert warnings.filters == before
    assert capsys.readouterr().err.startswith("hbfl: error: ")


def test_quiet_verbose_and_strict(tmp_path, capsys):
    """-q keeps the verdict (banner included) and the paths; -v adds a line per round;
    --strict exits 3 when the banner shows (2 rounds cannot establish convergence)."""
    argv = ["fit", "models/normal_normal.py", "--rounds", "2", "--local-steps", "2"]
    argv += ["--no-report", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    default = capsys.readouterr().out
    assert main(argv + ["-q"]) == 0
    quiet = capsys.readouterr()
    assert main(argv + ["--verbose"]) == 0
    verbose = capsys.readouterr().out
    assert main(argv + ["--quiet", "--strict"]) == EXIT_UNTRUSTWORTHY
    strict = capsys.readouterr()

    assert len(quiet.out) < len(default) / 2
    assert quiet.err == ""
    lines = quiet.out.splitlines()
    assert lines[0].startswith("verdict: max rounds reached in 2 rounds")
    assert "WARNING: this posterior is not trustworthy" in quiet.out  # the banner
    assert "convergence was not established" in quiet.out
    assert lines[-1] == f"wrote {tmp_path / 'summary.csv'}"
    # No header lines ("clients  10", ...) and no table rows ("theta  client03 ...").
    assert not any(line.startswith(("clients", "mu ", "theta ")) for line in lines)
    # -v: the default output with one line per round.
    rounds = [line for line in verbose.splitlines() if line.startswith("round ")]
    assert [line.split()[:2] for line in rounds] == [["round", "1"], ["round", "2"]]
    assert "ELBO" in rounds[0] and "clients 10" in rounds[0]
    assert [line for line in verbose.splitlines() if not line.startswith("round ")] == (
        default.splitlines()
    )
    assert strict.out == quiet.out
    assert strict.err.strip() == (
        f"hbfl: --strict: this posterior is not trustworthy (exit status {EXIT_UNTRUSTWORTHY}; "
        "files written)"
    )
    # -q and -v exclude each other: a usage error, status 2.
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["-q", "-v"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_quiet_fit_prints_no_third_party_warning(tmp_path):
    """A whole default (second-order) fit in a fresh process, where ArviZ would announce
    its rewrite: stderr is empty with -q, and stdout the verdict and the paths."""
    out = tmp_path / "es"
    result = subprocess.run(
        [_hbfl_script(), "fit", "models/eight_schools.py", "-q", "--strict", "--out", str(out)],
        cwd=ROOT,
        env=_fresh_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # reliable: --strict passes
    assert result.stderr == ""
    assert "FutureWarning" not in result.stdout and "ArviZ" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("verdict: converged in")
    assert lines[1:] == [f"wrote {out / name}" for name in ("summary.csv",) + REPORT_FILES]


def test_on_client_failure_reaches_the_fit(tmp_path, capsys, monkeypatch):
    """--on-client-failure drop goes to FederatedSVI (first-order servers only: with the
    second-order server it is refused, naming the option); a bad value is a usage error."""
    import functools

    from hbfl_pyro import FederatedSVI

    seen = {}
    original = FederatedSVI.__init__

    @functools.wraps(original)  # (the CLI's --help reads the signature's defaults)
    def init(self, model, data, **options):
        seen.update(options)
        original(self, model, data, **options)

    monkeypatch.setattr(FederatedSVI, "__init__", init)
    argv = ["fit", "models/normal_normal.py", "--rounds", "1", "--local-steps", "1"]
    argv += ["--no-report", "--no-progress", "-q", "--out", str(tmp_path)]
    assert main(argv + ["--on-client-failure", "drop"]) == 0
    assert seen["on_client_failure"] == "drop"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--on-client-failure", "ignore"])
    assert exit_info.value.code == 2
