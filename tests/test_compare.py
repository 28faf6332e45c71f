"""One-call comparison of a federated fit with pooled Pyro SVI, pooled NUTS and a reference.

On the conjugate Normal–Normal model the exact posterior is known (Gaussian), and so is the
mean-field optimum: the same means, with sds ``1 / sqrt(diag(precision))``. So each method
is checked against the truth it should reach:

- NUTS against the exact posterior (means and sds), within its Monte Carlo error;
- federated and pooled VI (the same mean-field family) against the exact means and the
  mean-field sds, within their optimiser and Monte Carlo error;
- federated against pooled VI (what the table's ``fed_vs_pooled_z`` column reports).

And the table has one row per parameter with the documented columns; the CLI's
``--compare-pooled`` writes its files.
"""

import csv
import math
from pathlib import Path

import normal_normal
import pytest
import torch

from hbfl_pyro import FederatedSVI
from hbfl_pyro.cli import main
from hbfl_pyro.compare import compare_pooled, reference_rows

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 5
NUM_DRAWS = 4000  # VI draws: MC error of a mean 1/sqrt(4000) = 0.016 sd, of an sd ~1.1%
NUTS_DRAWS = 400
# NUTS on this 6-dimensional Gaussian mixes well (effective sample size >= ~300 of the 400
# draws, measured 580 of 400 at 10 clients: anti-correlated draws). MC error of a mean
# <= 1/sqrt(300) = 0.058 sd; of an sd <= 1/sqrt(2 * 300) = 4%. Over 6 parameters, ~3.5 MC
# standard errors: 0.2 sd and 15%.
NUTS_Z, NUTS_SD = 0.2, 0.15
# Mean-field VI means: the optimiser's residual (the closed-form federated fit reaches the
# optimum to 1e-3, pooled SVI ends with a 100-fold decayed step) plus 3.5 MC standard errors
# of 4000 draws (0.06 sd): 0.1 sd. Sds: 3.5 MC standard errors (4%) plus 3% optimiser
# residual: 7%.
VI_Z, VI_SD = 0.1, 0.07


@pytest.fixture(scope="module")
def comparison():
    torch.set_default_dtype(torch.float64)
    data = normal_normal.load_data(num_clients=NUM_CLIENTS)
    # The settings of tests/test_closed_form.py: the local steps' decaying step size takes
    # every client's q_i to its optimum, so the fit is the mean-field optimum.
    fit = FederatedSVI(
        normal_normal.model,
        data,
        seed=0,
        local_steps=100,
        local_lr=0.1,
        local_lr_decay=0.65,
        num_particles=2,
    )
    fit.run(12, progress=False)
    mean, cov = normal_normal.exact_posterior(data)
    sd = cov.diagonal().sqrt()
    exact = {
        "mu": {"mean": float(mean[0]), "sd": float(sd[0])},
        "theta": {"mean": mean[1:].tolist(), "sd": sd[1:].tolist()},
    }
    result = compare_pooled(
        fit,
        svi=dict(steps=1500, lr=0.05, num_particles=4),
        nuts=dict(warmup=200, samples=NUTS_DRAWS),
        reference=exact,
        num_samples=NUM_DRAWS,
        elbo_particles=2000,
        seed=0,
        progress=False,
    )
    torch.set_default_dtype(torch.float32)
    return result, data


@pytest.mark.slow
def test_table_rows_and_columns(comparison):
    c, data = comparison
    names = list(data)
    assert [(r["site"], r["client"], r["index"]) for r in c.rows] == [("mu", "", "")] + [
        ("theta", n, "") for n in names
    ]
    assert c.methods == ("federated", "pooled_svi", "nuts", "reference")
    assert c.reference == "reference"
    expected = ["site", "client", "index"]
    for m in c.methods:
        expected += [f"{m}_mean", f"{m}_sd"]
    for m in ("federated", "pooled_svi", "nuts"):
        expected += [f"{m}_z", f"{m}_sd_ratio"]
    expected += ["fed_vs_pooled_z", "fed_vs_pooled_sd_ratio"]
    assert c.columns == expected
    assert all(math.isfinite(r[col]) for r in c.rows for col in expected[3:])
    assert set(c.timings) == {"federated", "pooled_svi", "nuts"}
    assert set(c.elbo) == {"federated", "pooled_svi"}
    markdown = c.to_markdown()
    assert markdown.count("| theta |") == NUM_CLIENTS
    assert "NUTS: " in markdown and "divergent" in markdown


@pytest.mark.slow
def test_methods_agree_with_the_exact_posterior(comparison, report):
    c, data = comparison
    mf = normal_normal.mean_field_optimum(data)
    mf_sd = [float(mf["mu"][1])] + mf["theta"][1].tolist()
    for r, sd_mf in zip(c.rows, mf_sd):
        label = f"{r['site']} {r['client']}".strip()
        report(
            f"compare normal-normal {label:14s} z fed {r['federated_z']:+.3f} pooled "
            f"{r['pooled_svi_z']:+.3f} NUTS {r['nuts_z']:+.3f}; sd ratio NUTS "
            f"{r['nuts_sd_ratio']:.3f}; fed - pooled {r['fed_vs_pooled_z']:+.3f} sd"
        )
        assert abs(r["nuts_z"]) <= NUTS_Z, label
        assert abs(r["nuts_sd_ratio"] - 1) <= NUTS_SD, label
        for m in ("federated", "pooled_svi"):
            assert abs(r[f"{m}_z"]) <= VI_Z, (label, m)
            assert abs(r[f"{m}_sd"] / sd_mf - 1) <= VI_SD, (label, m)
        # Both VI fits are within VI_Z of the truth: their difference within 2 VI_Z.
        assert abs(r["fed_vs_pooled_z"]) <= 2 * VI_Z, label
    # The two ELBO estimates (2000 particles each: MC sd ~0.05 nats here) of the same
    # optimum agree to well within a nat.
    assert abs(c.elbo["federated"] - c.elbo["pooled_svi"]) <= 0.5


@pytest.mark.slow
def test_csv_and_forest_plot(comparison, tmp_path):
    c, _ = comparison
    path = c.to_csv(tmp_path / "comparison.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == c.columns
    assert len(rows) == len(c.rows)
    assert float(rows[0]["nuts_mean"]) == pytest.approx(c.rows[0]["nuts_mean"], rel=1e-12)
    c.plot_forest(tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_rows_resolves_posteriordb_names():
    keys = [("mu", "", ""), ("theta", "A", ""), ("theta", "B", ""), ("v", "", "[1]")]
    ref = {
        "mu": {"mean": 1.0, "sd": 2.0},
        "theta[2]": {"mean": 3.0, "sd": 4.0},
        "v": {"mean": [5.0, 6.0], "sd": [7.0, 8.0]},
        "log_tau": {"mean": 0.0, "sd": 1.0},  # derived: matches no row, ignored
    }
    assert reference_rows(ref, keys, ["A", "B"]) == {
        ("mu", "", ""): (1.0, 2.0),
        ("theta", "B", ""): (3.0, 4.0),
        ("v", "", "[1]"): (6.0, 8.0),
    }


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="fitted FederatedSVI"):
        compare_pooled(normal_normal.model)
    # A first-order fit has a q(phi) before any round: the checks run without fitting.
    data = normal_normal.load_data(num_clients=3)
    fit = FederatedSVI(normal_normal.model, data, seed=0, server="first_order")
    with pytest.raises(ValueError, match="unknown nuts settings"):
        compare_pooled(fit, nuts={"num_warmup": 10}, svi=False)
    with pytest.raises(ValueError, match="matches no parameter"):
        compare_pooled(fit, svi=False, nuts=False, reference={"x": {"mean": 0.0, "sd": 1.0}})


@pytest.mark.slow
def test_cli_compare_pooled_writes_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", str(ROOT / "models" / "normal_normal.py"), "--rounds", "3", "--out", str(out)]
    argv += ["--compare-pooled", "--pooled-steps", "100", "--nuts-warmup", "30"]
    argv += ["--nuts-samples", "30", "--num-samples", "200", "--no-progress"]
    assert main(argv) == 0
    for name in ("comparison.csv", "comparison.png", "report.md", "summary.csv"):
        assert (out / name).is_file(), name
    report_text = (out / "report.md").read_text()
    assert "## Comparison with pooled fits" in report_text
    assert "| mu |" in report_text.split("## Comparison with pooled fits")[1]
    with (out / "comparison.csv").open() as f:
        header = next(csv.reader(f))
    assert header[:5] == ["site", "client", "index", "federated_mean", "federated_sd"]
    assert "nuts_z" not in header and "federated_z" in header  # NUTS is the reference
    assert "fed − pooled" in capsys.readouterr().out


def test_a_constant_reference_element_gets_no_z():
    """An element the reference holds fixed (sd 0, e.g. the unit diagonal of an LKJ
    Cholesky factor) gets z = NaN and sd ratio NaN, left out of the statistics, instead of
    a division by zero."""
    fit = FederatedSVI(normal_normal.model, normal_normal.load_data(num_clients=3), seed=0)
    fit.run(2, progress=False)
    reference = {"mu": {"mean": 0.0, "sd": 0.0}, "theta": {"mean": [0.0] * 3, "sd": [1.0] * 3}}
    c = compare_pooled(fit, svi=False, nuts=False, reference=reference, num_samples=200)
    mu = next(r for r in c.rows if r["site"] == "mu")
    assert math.isnan(mu["federated_z"]) and math.isnan(mu["federated_sd_ratio"])
    stats = c.stats()
    assert "federated global" not in stats  # no finite z among the global rows
    assert stats["federated local"]["n"] == 3


def test_pooled_guide_rebuilds_the_family_as_given():
    """A global guide given as a partial (an autoguide class with fixed keywords, as the
    named families give AutoMultivariateNormal its init) is rebuilt with those keywords."""
    import functools

    from pyro.infer.autoguide import AutoMultivariateNormal

    from hbfl_pyro.compare import pooled_guide

    torch.set_default_dtype(torch.float64)
    spec = functools.partial(AutoMultivariateNormal, init_scale=0.037)
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=3),
        global_guide=spec,
        server="gradient",
        seed=0,
    )
    assert fit.server.global_guide._init_scale == 0.037
    guide = pooled_guide(fit)
    assert isinstance(guide.global_guide, AutoMultivariateNormal)
    assert guide.global_guide._init_scale == 0.037


def test_pooled_structured_factor_is_recentred_like_the_clients():
    """Pooled SVI gives a structured factor the clients' optimisation aid: its features are
    recentred at draws of q(phi) during the run (here: away from their initial zero)."""
    from hbfl_pyro import StructuredLocalNormal
    from hbfl_pyro.compare import RECENTRE_EVERY, _recentring, pooled_guide

    torch.set_default_dtype(torch.float64)
    fit = FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=3),
        local_guide=StructuredLocalNormal,
        server="gradient",
        seed=0,
    )
    guide = pooled_guide(fit)
    with torch.no_grad():  # move q(phi) so that its mean is far from zero
        guide.global_guide.locs.mu.fill_(5.0)
    hook = _recentring(guide, fit.structure, fit.data.collate(), seed=0)
    hook(RECENTRE_EVERY + 1)  # not a recentring step
    assert torch.all(guide.local_guide.centres.theta == 0)
    hook(0)
    assert torch.allclose(guide.local_guide.centres.theta, torch.tensor(5.0), atol=0.1)
    # compare_pooled runs it (a short run, no NUTS).
    c = compare_pooled(fit, svi={"steps": 20}, nuts=False, num_samples=200, progress=False)
    assert math.isfinite(c.elbo["pooled_svi"])
