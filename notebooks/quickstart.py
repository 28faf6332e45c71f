# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: eight schools, fitted federated
#
# Eight schools (Rubin 1981; BDA3 §5.5) is the smallest hierarchical model worth fitting,
# and it is a federated problem in disguise: each school is a *client* that holds its own
# estimated coaching effect `y_j` and standard error `sigma_j`, and we pretend neither may
# leave the school. The hierarchy is
#
#     mu ~ Normal(0, 5),  tau ~ HalfCauchy(5)        global (the server's factor q(mu, tau))
#     theta_j | mu, tau ~ Normal(mu, tau)           local  (school j's own factor q_j)
#     y_j | theta_j ~ Normal(theta_j, sigma_j)      observed, private to school j
#
# The model is an ordinary Pyro model with a `clients` plate; `FederatedSVI` fits the
# mean-field family `q(mu, tau) prod_j q_j(theta_j)` by alternating client updates (each
# school ascends its own block of the ELBO on its own data) and server updates (here by
# gradient: `tau` has no conjugate update). Nothing but variational parameters and
# gradients crosses the boundary.
#
# This notebook: fit the model file `models/eight_schools.py`, read the posterior with the
# library's summary and with ArviZ, compare the centred and non-centred parametrisations,
# and predict for a ninth school that was not in the federation.
#
# Run as a script: `python notebooks/quickstart.py` (the full analysis, about two minutes
# on two CPU cores) or `HBFL_SMOKE=1 python notebooks/quickstart.py` (small sizes, for the
# test suite). Figures and a JSON of key numbers go to `$HBFL_NOTEBOOK_OUT`
# (default `runs/notebooks/`).

# %%
import json
import os
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

# ArviZ 0.23 announces its 1.x rewrite on import; nothing to act on here.
warnings.filterwarnings("ignore", message="(?s).*arviz.*", category=FutureWarning)
import arviz as az  # noqa: E402

from hbfl_pyro import (  # noqa: E402
    FederatedSVI,
    new_client_predictive,
    personalise,
    to_inference_data,
)
from hbfl_pyro.modelfile import load_model_file  # noqa: E402
from hbfl_pyro.summary import format_table, posterior_summary  # noqa: E402

SMOKE = os.environ.get("HBFL_SMOKE") == "1"  # small sizes: the test suite's run
IN_JUPYTER = "ipykernel" in sys.modules
if not IN_JUPYTER:
    plt.switch_backend("Agg")  # running as a script: write files, open no windows


def _repo_root() -> Path:
    """The repository root (where `models/` lives), from a script or a notebook kernel."""
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "models" / "eight_schools.py").exists():
            return folder
    raise FileNotFoundError("run this notebook from inside the hbfl_pyro repository")


ROOT = _repo_root()
OUT = Path(os.environ.get("HBFL_NOTEBOOK_OUT", ROOT / "runs" / "notebooks")) / "quickstart"
OUT.mkdir(parents=True, exist_ok=True)
# The library computes in float64 (as `hbfl fit` does); set it before building any tensor.
torch.set_default_dtype(torch.float64)
NUM_DRAWS = 1000 if SMOKE else 4000


def save(fig, name: str) -> None:
    """Write a figure to OUT; show it when running in Jupyter."""
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if IN_JUPYTER:
        plt.show()
    plt.close(fig)


# %% [markdown]
# ## The model file
#
# A model file is a plain Python file with `model(data)` and `load_data()` (and optionally
# `fit_options`, the settings `hbfl fit` uses). `load_model_file` imports it by path, as
# the command line does. `model` here is the non-centred parametrisation:
# `theta_trans_j ~ Normal(0, 1)` is the local site and `theta_j = mu + tau * theta_trans_j`
# is recorded with `pyro.deterministic`.

# %%
spec = ROOT / "models" / "eight_schools.py"
# The mean-field family's settings (`guide_options["mean-field"]`); `hbfl fit` without
# `--guide` runs the second-order server instead, with no settings at all.
noncentred = load_model_file(spec, guide="mean-field")
clients = noncentred.load_data()
for school, d in clients.items():
    print(f"school {school}: y = {float(d['y']):5.1f}, sigma = {float(d['sigma']):4.1f}")

# %% [markdown]
# The file's mean-field settings are those the test suite shows reach the pooled-SVI
# optimum (300 rounds, with step sizes decaying by 100x over the run). In smoke mode we run
# fewer rounds and rescale the decays so the schedule still ends where it should.

# %%
ROUNDS = 150 if SMOKE else noncentred.rounds
options = dict(noncentred.options)
options["lr_decay"] = options["local_lr_decay"] = 0.01 ** (1 / ROUNDS)
# All schools of a round in one batched computation: the same updates as the per-client
# loop (tests/test_vectorised.py), a few times faster in simulation.
options["engine"] = "vectorised"

fit = FederatedSVI(noncentred.model, clients, seed=0, **options)
print("server mode:", fit.server.mode)
print("global sites:", fit.structure.global_sites, "| local sites:", fit.structure.local_sites)
fit.run(ROUNDS, progress=not SMOKE)
print(f"ELBO estimate after {fit.round} rounds: {fit.elbo():.2f}")

# %% [markdown]
# ## The posterior
#
# `posterior_summary` draws from the fitted `q` and recomputes the deterministic `theta_j`
# on each school; it is what `hbfl fit` prints.

# %%
rows = posterior_summary(fit, num_samples=NUM_DRAWS, seed=0)
print(format_table(rows))

# %% [markdown]
# The same draws as an ArviZ `InferenceData`: the global sites have dims `(chain, draw)`,
# the local and per-school deterministic sites `(chain, draw, client)` with the school names
# as coordinates. The draws are *independent* draws from `q` (one chain), so use
# `kind="stats"`: R-hat and ESS are MCMC diagnostics and say nothing here.

# %%
idata = to_inference_data(fit, num_samples=NUM_DRAWS, seed=0)
print(az.summary(idata, var_names=["mu", "tau", "theta"], kind="stats"))

# %%
axes = az.plot_forest(idata, var_names=["mu", "tau", "theta"], combined=True, hdi_prob=0.9)
axes[0].set_title("eight schools, federated mean-field VI (90% intervals)")
save(axes[0].figure, "forest.png")

# %% [markdown]
# For reference, posteriordb's NUTS reference posterior (non-centred model) has
# `mu` = 4.41 ± 3.31 and `tau` = 3.60 ± 3.20 (mean ± sd). Mean-field VI gets `mu` close
# and, as usual, understates the spread of `tau` and of the `theta_j`: it cannot represent
# how the school effects fan out as `tau` grows. The structured family (a local factor
# `q_j(theta_j | mu, tau)` whose mean and scale follow the globals) addresses that:
# `FederatedSVI(..., **guide_family("structured"))` from `hbfl_pyro.guides`, or
# `hbfl fit models/eight_schools.py --guide structured`: tau's sd ratio against NUTS
# rises from 0.76 to 0.92 with every mean within 0.19 sd, in the same 300 rounds
# (`tests/test_eight_schools_reference.py`).

# %%
globals_ = fit.global_samples(NUM_DRAWS)
mu_draws, tau_draws = globals_["mu"], globals_["tau"]
print(
    f"federated VI: mu = {mu_draws.mean():.2f} ± {mu_draws.std():.2f}, "
    f"tau = {tau_draws.mean():.2f} ± {tau_draws.std():.2f}"
)
print("NUTS reference: mu = 4.41 ± 3.31, tau = 3.60 ± 3.20")

# %% [markdown]
# ## Centred vs non-centred
#
# The centred model samples `theta_j ~ Normal(mu, tau)` directly. Its posterior is a funnel
# (small `tau` forces all `theta_j` together), and a mean-field `q` placed on it shrinks
# `tau` towards zero: the ELBO rewards a narrow `q(theta_j)`, which a small `tau` makes
# cheap. Same data, same optimiser settings, only the parametrisation differs.

# %%
centred = load_model_file(f"{spec}:centered", guide="mean-field")
fit_c = FederatedSVI(centred.model, clients, seed=0, **options)
fit_c.run(ROUNDS, progress=not SMOKE)
tau_c = fit_c.global_samples(NUM_DRAWS)["tau"]
mu_c = fit_c.global_samples(NUM_DRAWS)["mu"]
print(f"{'':12s} {'mu mean':>8s} {'mu sd':>6s} {'tau mean':>9s} {'tau sd':>7s} {'tau q5':>7s}")
for label, m, t in (("non-centred", mu_draws, tau_draws), ("centred", mu_c, tau_c)):
    print(
        f"{label:12s} {m.mean():8.2f} {m.std():6.2f} {t.mean():9.2f} {t.std():7.2f} "
        f"{t.quantile(0.05):7.2f}"
    )

# %% [markdown]
# ## A ninth school
#
# A school that was not in the federation gets the *population predictive* of its effect,
# `p(theta_new) = ∫ p(theta | mu, tau) q(mu, tau) d(mu, tau)`: draws of the globals from
# `q`, then the model's own prior of the local site. Given its standard error (say 12), the
# same call also draws its *outcome* `y_new`, whose spread adds the measurement noise.
#
# If the new school has an estimate of its own (say `y` = 20 ± 10), `personalise` fits its
# `q(theta_new)` exactly as a federated client would in a round, with `q(mu, tau)` as the
# prior, and sends nothing back: the federation is unchanged. Its factor is over the local
# site `theta_trans`; `sample` pairs it with draws of `q(mu, tau)` and also returns the
# model's deterministic effect `theta = mu + tau * theta_trans`.

# %%
new = new_client_predictive(
    fit, NUM_DRAWS, seed=1, data={"y": torch.tensor(0.0), "sigma": torch.tensor(12.0)}
)
theta_new, y_new = new["theta"], new["y"]
print(f"population predictive: theta_new = {theta_new.mean():.2f} ± {theta_new.std():.2f}")
print(f"                       y_new     = {y_new.mean():.2f} ± {y_new.std():.2f}")

NEW_Y, NEW_SIGMA = 20.0, 10.0
mine = personalise(
    fit, {"y": torch.tensor(NEW_Y), "sigma": torch.tensor(NEW_SIGMA)}, steps=500, lr=0.05
)
theta_mine = mine.sample(NUM_DRAWS, seed=2)["theta"]  # joint draws of q(mu, tau) q(theta_new)
print(
    f"personalised (y = {NEW_Y:g} ± {NEW_SIGMA:g}): theta = {theta_mine.mean():.2f} "
    f"± {theta_mine.std():.2f}  (shrunk from {NEW_Y:g} towards mu ≈ {mu_draws.mean():.1f})"
)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
bins = np.linspace(-40, 50, 91)
ax.hist(theta_new.numpy(), bins=bins, density=True, alpha=0.5, label="theta_new (population)")
ax.hist(y_new.numpy(), bins=bins, density=True, alpha=0.4, label="y_new (sigma = 12)")
ax.hist(theta_mine.numpy(), bins=bins, density=True, alpha=0.6, label="theta_new | y = 20 ± 10")
ax.axvline(NEW_Y, color="k", ls=":", label="the new school's own estimate")
ax.set_xlabel("coaching effect")
ax.legend()
ax.set_title("a school outside the federation")
save(fig, "new_school.png")

# %% [markdown]
# Key numbers, written for the test suite (which checks them loosely) and for comparison
# between runs.

# %%
numbers = {
    "smoke": SMOKE,
    "rounds": ROUNDS,
    "num_draws": NUM_DRAWS,
    "mu_mean": float(mu_draws.mean()),
    "mu_sd": float(mu_draws.std()),
    "tau_mean": float(tau_draws.mean()),
    "tau_sd": float(tau_draws.std()),
    "tau_mean_centred": float(tau_c.mean()),
    "theta_new_mean": float(theta_new.mean()),
    "theta_new_sd": float(theta_new.std()),
    "y_new_sd": float(y_new.std()),
    "y_new_sigma": 12.0,
    "personal_y": NEW_Y,
    "personal_theta_mean": float(theta_mine.mean()),
    "personal_theta_sd": float(theta_mine.std()),
}
(OUT / "numbers.json").write_text(json.dumps(numbers, indent=2))
print(json.dumps(numbers, indent=2))
