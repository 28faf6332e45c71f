"""The notebooks in ``notebooks/`` run as scripts at small sizes (``HBFL_SMOKE=1``).

Each notebook is a jupytext percent ``.py`` file. Here each runs in a subprocess, as a user
would run it, writing its figures and a ``numbers.json`` of key results into ``tmp_path``.
The test checks the exit code, that every figure was written, and that the numbers
are sound statistically. Each tolerance is justified next to its check. The smoke sizes are
the notebooks' own; the numbers quoted in comments were measured at those sizes (seed 0).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# notebook -> (output folder, figures it must write)
FIGURES = {
    "quickstart": ("quickstart", ("forest.png", "new_school.png")),
    "radon_case_study": ("radon", ("globals.png", "shrinkage.png", "new_county.png")),
    "custom_prior": ("custom_prior", ("prior_forest.png", "school_effects.png", "horseshoe.png")),
    "diagnostics": ("diagnostics", ("elbo.png", "khat.png", "ppc.png", "bpv_sd.png")),
}

# posteriordb's NUTS reference for eight schools (non-centred): mean and sd of mu.
MU_REF, MU_REF_SD = 4.41, 3.31


def _run(name: str, out: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HBFL_SMOKE="1",
        HBFL_NOTEBOOK_OUT=str(out),
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        [sys.executable, str(NOTEBOOKS / f"{name}.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"notebooks/{name}.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    folder, figures = FIGURES[name]
    for figure in figures:
        path = out / folder / figure
        assert path.is_file() and path.stat().st_size > 1000, f"{name} did not write {path}"
    numbers = json.loads((out / folder / "numbers.json").read_text())
    assert numbers["smoke"] is True
    return numbers


def _check_quickstart(n: dict) -> None:
    draws = n["num_draws"]
    # The population predictive theta_new = mu + tau * z has mean E_q[mu]: the two
    # estimates differ only by Monte Carlo error (4 standard errors of their difference).
    se = ((n["theta_new_sd"] ** 2 + n["mu_sd"] ** 2) / draws) ** 0.5
    assert abs(n["theta_new_mean"] - n["mu_mean"]) < 4 * se
    # y_new = theta_new + noise of sd 12: Var(y_new) = Var(theta_new) + 144. The relative
    # standard error of a sample variance is sqrt(2 / n) = 4.5% at n = 1000 for a Normal,
    # somewhat more for the heavier-tailed mixture here; 15% is about 3 standard errors.
    expected = n["theta_new_sd"] ** 2 + n["y_new_sigma"] ** 2
    assert abs(n["y_new_sd"] ** 2 / expected - 1) < 0.15
    # Personalising on y = 20 shrinks towards the population: in the non-centred model the
    # optimal Gaussian q(theta_trans) puts E[theta] = E[mu] + w (y - E[mu]) with w in (0, 1).
    assert n["mu_mean"] < n["personal_theta_mean"] < n["personal_y"]
    # The smoke fit (150 rounds) lands within 0.5 reference sd of NUTS's mu (measured:
    # 4.27, i.e. -0.04 sd). Mean-field VI is within ~0.1 sd at full length
    # (tests/test_eight_schools_reference.py); the rest is room for the shorter schedule.
    assert abs(n["mu_mean"] - MU_REF) < 0.5 * MU_REF_SD
    # The centred parametrisation is a funnel: mean-field VI collapses tau there (measured
    # 0.94 vs 3.09 non-centred). Half the non-centred value separates them with room.
    assert n["tau_mean_centred"] < 0.5 * n["tau_mean"]


def _check_radon(n: dict) -> None:
    # Partial pooling: counties with <= 3 homes keep less of their raw deviation from the
    # county regression than counties with >= 20 homes (for a Normal hierarchy the kept
    # share is n sa^2 / (n sa^2 + sy^2), increasing in n; measured 0.25 vs 0.76), and the
    # posterior county means spread less than the raw means (measured 0.27 vs 0.49).
    assert n["kept_small_counties"] < n["kept_large_counties"]
    assert n["posterior_mean_sd"] < n["raw_mean_sd"]
    # Three homes of its own narrow the new county's intercept (measured sd 0.27 vs 0.34).
    assert n["alpha_personalised"][1] < n["alpha_pop"][1]
    # Basement readings are higher: the floor effect is negative (Gelman & Hill: -0.69,
    # sd 0.07); the 30-round smoke fit has -0.23 ± 0.08, so only the sign is checked.
    assert n["globals"]["beta"]["federated"][0] < 0


def _check_custom_prior(n: dict) -> None:
    # The same Student-t model fitted with AutoNormal guides and with the hand-written guides
    # (a Normal q(mu) in both): E_q[mu] agrees within 0.25 reference sd (measured 4.32 vs
    # 4.28). Monte Carlo error of each mean is ~0.1 (1000 draws) plus optimisation noise.
    assert abs(n["student_t"]["mu"] - n["custom_guides"]["mu"]) < 0.25 * MU_REF_SD
    # Leave-one-school-out elpd of both priors is close to the exact LOO of complete pooling,
    # -30.56 (the schools' spread is small next to their standard errors, so a hierarchical
    # predictive that is roughly right is close to it; measured -30.55 and -30.78). 2 nats
    # still catches a predictive that is badly off in location or spread.
    for model in ("normal", "student_t"):
        assert abs(n["elpd_loo"][model] - (-30.56)) < 2.0
    # The learned degrees of freedom of the Student-t local factor stay finite and moderate.
    assert all(2.0 < df < 50.0 for df in n["custom_guides"]["df"])
    # Horseshoe: every school's E[theta] lies between the population mean and its own
    # estimate (shrinkage; conditionally on the globals the posterior mean is a weighted
    # average of the two), with 1.0 of slack for Monte Carlo and optimisation noise
    # (the posterior sds are 4-6); the per-school scales are finite and positive.
    hs = n["horseshoe"]
    for y, theta in zip(n["y"], hs["theta_mean"]):
        low, high = min(y, hs["mu"]), max(y, hs["mu"])
        assert low - 1.0 <= theta <= high + 1.0, (y, theta, hs["mu"])
    assert all(0.0 < lam < 100.0 for lam in hs["lambda_median"])


def _check_diagnostics(n: dict) -> None:
    # The optimiser made progress: the last tenth's ELBO is above the first tenth's
    # (measured -1090 vs -1535; the per-round noise is a few nats).
    for trace in n["elbo"].values():
        assert trace["last_tenth"] > trace["first_tenth"]
    # Uranium predicts a new county's homes better (Gelman & Hill: g1 = 0.72, sd 0.09); the
    # smoke fit measures elpd_diff 15.5 with dse 4.5, asserted at more than one dse.
    assert n["elpd_diff"]["without_uranium"] > n["dse"]["without_uranium"] > 0
    # The fitted mean of log radon reproduces the observed mean: its posterior predictive
    # p-value is not extreme (measured 0.35).
    assert 0.05 < n["ppc_p_values"]["mean"] < 0.95
    assert n["num_observations"] == 919


CHECKS = {
    "quickstart": _check_quickstart,
    "radon_case_study": _check_radon,
    "custom_prior": _check_custom_prior,
    "diagnostics": _check_diagnostics,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    numbers = _run(name, tmp_path)
    CHECKS[name](numbers)


def test_notebooks_are_jupytext_percent_scripts():
    """Every notebook is a percent-format script with prose: what jupytext reads."""
    for name in CHECKS:
        text = (NOTEBOOKS / f"{name}.py").read_text()
        assert "format_name: percent" in text
        assert text.count("# %% [markdown]") >= 3, f"{name}: too little prose"
        assert 'os.environ.get("HBFL_SMOKE") == "1"' in text
