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
# # Case study: Minnesota radon, one client per county
#
# Gelman & Hill's radon data (2007, ch. 12): 919 homes in 85 counties, each home's log
# radon `y_ij` measured on floor `x_ij` (0 = basement, 1 = first floor), each county's log
# soil uranium `u_j`. The model of `models/radon.py` has varying county intercepts with a
# county-level predictor and a common floor effect:
#
#     g0, g1, beta ~ Normal(0, 10),   sigma_a, sigma_y ~ HalfNormal(1)
#     alpha_j ~ Normal(g0 + g1 u_j, sigma_a)                  one per county (local)
#     y_ij ~ Normal(alpha_j + beta x_ij, sigma_y)
#
# Each county is a client that keeps its homes' measurements. `beta` and `sigma_y` are
# fixed effects inside the likelihood, so the server updates `q(phi)` by gradient (the
# clients send gradients of their ELBO blocks with respect to the global variational
# parameters). Counties are ragged (1 to 116 homes): the library pads and masks them.
#
# We hold one county out of the federation, fit the other 84 three ways on the same
# data and the same model —
#
# 1. **federated** mean-field SVI (`FederatedSVI`, the model file's mean-field settings),
# 2. **pooled** mean-field SVI (plain Pyro on the collated data: the same family, no
#    federation; `hbfl_pyro.pooled.fit_pooled_svi`),
# 3. **NUTS** on the pooled data (plain Pyro `MCMC`: the exact posterior, up to Monte Carlo
#    error),
#
# compare the global parameters, look at shrinkage of the county intercepts, and finally
# treat the held-out county as a newcomer: its population predictive, then `personalise`
# on a few of its homes and predict the rest.
#
# Run as a script: `python notebooks/radon_case_study.py` (full sizes: a few minutes on two
# CPU cores, most of it NUTS) or `HBFL_SMOKE=1 python notebooks/radon_case_study.py`.

# %%
import json
import os
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS, Predictive

warnings.filterwarnings("ignore", message="(?s).*arviz.*", category=FutureWarning)
from hbfl_pyro import (  # noqa: E402
    FederatedData,
    FederatedSVI,
    new_client_predictive,
    personalise,
)
from hbfl_pyro.guides import private_params  # noqa: E402
from hbfl_pyro.modelfile import load_model_file  # noqa: E402
from hbfl_pyro.pooled import fit_pooled_svi  # noqa: E402

SMOKE = os.environ.get("HBFL_SMOKE") == "1"
IN_JUPYTER = "ipykernel" in sys.modules
if not IN_JUPYTER:
    plt.switch_backend("Agg")


def _repo_root() -> Path:
    here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "models" / "radon.py").exists():
            return folder
    raise FileNotFoundError("run this notebook from inside the hbfl_pyro repository")


ROOT = _repo_root()
OUT = Path(os.environ.get("HBFL_NOTEBOOK_OUT", ROOT / "runs" / "notebooks")) / "radon"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_default_dtype(torch.float64)

# Sizes. Full: the model file's 250 rounds, 3,000 pooled steps (what tests/test_zoo.py
# compares), 1,000 NUTS draws after 1,000 warm-up. Smoke: enough to exercise every cell.
NUM_DRAWS = 1000 if SMOKE else 4000
POOLED_STEPS = 150 if SMOKE else 3000
NUTS_WARMUP, NUTS_DRAWS = (15, 15) if SMOKE else (1000, 1000)
NUTS_TREE_DEPTH = 4 if SMOKE else 10
GLOBALS = ("g0", "g1", "beta", "sigma_a", "sigma_y")


def save(fig, name: str) -> None:
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if IN_JUPYTER:
        plt.show()
    plt.close(fig)


# %% [markdown]
# ## Data, and a county held out
#
# `load_data()` returns `{county: {"log_radon": (n,), "floor": (n,), "log_uranium": ()}}`.
# We hold out DOUGLAS (9 homes): it joins at the end, as a new client.

# %%
# The file's default is the second-order server; this notebook shows the mean-field
# family's federated SVI (its rounds, ELBO traces and step-size settings).
radon = load_model_file(ROOT / "models" / "radon.py", guide="mean-field")
all_clients = radon.load_data()
HELD_OUT = "DOUGLAS"
held_out = all_clients[HELD_OUT]
clients = {name: d for name, d in all_clients.items() if name != HELD_OUT}
sizes = np.array([len(d["log_radon"]) for d in clients.values()])
print(
    f"{len(clients)} counties in the federation, {sizes.sum()} homes "
    f"({sizes.min()} to {sizes.max()} per county, median {int(np.median(sizes))})"
)
print(f"held out: {HELD_OUT}, {len(held_out['log_radon'])} homes")

# %% [markdown]
# ## 1. Federated SVI
#
# The model file's mean-field settings: 250 rounds, every county in every round, 3 local steps,
# 16 particles, moment-matched noise and the vectorised engine (all counties in one batched
# computation: a simulation device, the same updates as the per-client loop).

# %%
ROUNDS = 30 if SMOKE else radon.rounds
options = dict(radon.options)
options["lr_decay"] = options["local_lr_decay"] = 0.01 ** (1 / ROUNDS)
fit = FederatedSVI(radon.model, clients, seed=0, **options)
fit.run(ROUNDS, progress=not SMOKE)
fed_globals = fit.global_samples(NUM_DRAWS)
fed_alpha = fit.local_samples(NUM_DRAWS)["alpha"].reshape(NUM_DRAWS, len(clients))

# %% [markdown]
# ## 2. Pooled SVI: the same model and family, without federation
#
# `fit_pooled_svi` runs plain Pyro `SVI` with an `AutoNormal` guide on
# `FederatedData(clients).collate()`, the padded-and-masked batch of all counties that the
# model receives in a federated round too. Its guide is a `PyroModule` with its parameters
# kept inside it (`private_params`), so draws are taken in that same setting.

# %%
data = FederatedData(clients)
batch = data.collate()
pooled_guide, losses = fit_pooled_svi(
    radon.model, data, steps=POOLED_STEPS, lr=0.05, lr_decay=0.01, num_particles=16, seed=0
)
with private_params(), torch.no_grad():
    pyro.set_rng_seed(1)
    pooled = Predictive(pooled_guide, num_samples=NUM_DRAWS, parallel=True)(batch)
pooled = {k: v.reshape(NUM_DRAWS, -1).squeeze(-1) for k, v in pooled.items()}

# %% [markdown]
# ## 3. NUTS on the pooled data
#
# Plain Pyro `MCMC(NUTS(model))` on the same batch: the reference. (The padded rows are
# masked out by the model, so they do not enter the posterior.)

# %%
pyro.set_rng_seed(2)
mcmc = MCMC(
    NUTS(radon.model, max_tree_depth=NUTS_TREE_DEPTH),
    num_samples=NUTS_DRAWS,
    warmup_steps=NUTS_WARMUP,
    disable_progbar=SMOKE,
)
mcmc.run(batch)
nuts = {k: v.reshape(NUTS_DRAWS, -1).squeeze(-1) for k, v in mcmc.get_samples().items()}

# %% [markdown]
# ## The global parameters, three ways
#
# Means and standard deviations. Federated and pooled SVI fit the same variational family
# and should agree to within their optimisation noise (the test suite asserts 0.1 sd);
# both differ from NUTS where mean-field VI does — typically a somewhat smaller `sigma_a`
# and smaller sds, since `q` ignores the correlation between `g0`, `g1` and the intercepts.

# %%
table = {}
print(f"{'site':8s} {'federated':>17s} {'pooled SVI':>17s} {'NUTS':>17s}   z(fed-NUTS)")
for site in GLOBALS:
    f, p, n = fed_globals[site], pooled[site], nuts[site]
    z = float((f.mean() - n.mean()) / n.std())
    table[site] = {
        "federated": [float(f.mean()), float(f.std())],
        "pooled_svi": [float(p.mean()), float(p.std())],
        "nuts": [float(n.mean()), float(n.std())],
        "z_fed_vs_nuts": z,
    }
    print(
        f"{site:8s} {f.mean():8.3f} ± {f.std():6.3f} {p.mean():8.3f} ± {p.std():6.3f} "
        f"{n.mean():8.3f} ± {n.std():6.3f}   {z:+.2f}"
    )

# %%
fig, axes = plt.subplots(1, len(GLOBALS), figsize=(14, 3))
for ax, site in zip(axes, GLOBALS):
    for k, (label, draws) in enumerate(
        (("federated", fed_globals[site]), ("pooled SVI", pooled[site]), ("NUTS", nuts[site]))
    ):
        m, s = float(draws.mean()), float(draws.std())
        ax.errorbar(m, -k, xerr=2 * s, fmt="o", capsize=3, label=label)
    ax.set_title(site)
    ax.set_yticks([])
axes[0].legend(loc="lower left", fontsize=7)
fig.suptitle("global parameters: mean ± 2 sd")
save(fig, "globals.png")

# %% [markdown]
# ## Shrinkage
#
# Each county's raw mean of log radon against its posterior intercept `alpha_j` (plus the
# floor effect at the county's own share of first-floor homes, so both are on the scale of
# the county's average home). Counties with few homes are pulled hard towards the
# county-level regression `g0 + g1 u_j`; large counties keep their own mean. This is partial
# pooling, and it happens here without any county revealing its homes.

# %%
names = list(clients)
raw_mean = np.array([float(clients[c]["log_radon"].mean()) for c in names])
floor_share = np.array([float(clients[c]["floor"].mean()) for c in names])
uranium = np.array([float(clients[c]["log_uranium"]) for c in names])
beta_mean = float(fed_globals["beta"].mean())
post_mean = fed_alpha.mean(0).numpy() + beta_mean * floor_share
nuts_post = nuts["alpha"].mean(0).numpy() + float(nuts["beta"].mean()) * floor_share
regression = float(fed_globals["g0"].mean()) + float(fed_globals["g1"].mean()) * uranium

fig, ax = plt.subplots(figsize=(6, 6))
ax.scatter(raw_mean, post_mean, s=8 + 2 * sizes, alpha=0.6, label="federated (size: homes)")
ax.scatter(raw_mean, nuts_post, s=6, color="k", marker="x", label="NUTS")
lims = [raw_mean.min() - 0.2, raw_mean.max() + 0.2]
ax.plot(lims, lims, "k:", lw=1, label="no pooling (y = x)")
ax.set_xlabel("county raw mean of log radon")
ax.set_ylabel("posterior mean: alpha_j + beta * (share of first-floor homes)")
ax.legend(fontsize=8)
ax.set_title("shrinkage of county intercepts")
save(fig, "shrinkage.png")

# How much of the gap between the raw mean and the county regression is kept, by county size:
# the weight 1 - w_j in  posterior = w_j * regression + (1 - w_j) * raw.
gap = raw_mean - (regression + beta_mean * floor_share)
kept = (post_mean - (regression + beta_mean * floor_share)) / np.where(gap == 0, np.nan, gap)
small, large = sizes <= 3, sizes >= 20
print(
    f"median share of the raw deviation kept: counties with <= 3 homes "
    f"{np.nanmedian(kept[small]):.2f}, with >= 20 homes {np.nanmedian(kept[large]):.2f}"
)
print(f"spread of county means: raw sd {raw_mean.std():.3f}, posterior sd {post_mean.std():.3f}")

# %% [markdown]
# ## A new county
#
# DOUGLAS joins after training. Before it has fitted anything, its intercept has the
# population predictive `∫ p(alpha | g0, g1, sigma_a; u) q(phi) dphi` at its own uranium
# level; with its floors given, `new_client_predictive` also draws its homes' log radon.
# Then it `personalise`s on its first three homes (its own `q(alpha_new)` with `q(phi)` as
# the prior; nothing is sent back) and we predict the other homes. We score both
# predictions by the log predictive density of the held-out homes, estimated with the draws.

# %%
K = 3
y_new, floor_new = held_out["log_radon"], held_out["floor"]
population = new_client_predictive(fit, NUM_DRAWS, seed=3, data=held_out)
mine = personalise(
    fit,
    {"log_radon": y_new[:K], "floor": floor_new[:K], "log_uranium": held_out["log_uranium"]},
    steps=500,
    lr=0.05,
    seed=0,
)
alpha_pop = population["alpha"].reshape(NUM_DRAWS)
alpha_mine = mine.sample(NUM_DRAWS, seed=4)["alpha"].reshape(NUM_DRAWS)


def log_pred_density(alpha: torch.Tensor) -> float:
    """log (1/S) sum_s prod_i Normal(y_i | alpha_s + beta_s x_i, sigma_y_s) over homes K.."""
    g = fed_globals
    loc = alpha[:, None] + g["beta"].reshape(-1, 1) * floor_new[K:]
    logp = torch.distributions.Normal(loc, g["sigma_y"].reshape(-1, 1)).log_prob(y_new[K:])
    return float(torch.logsumexp(logp.sum(-1), 0) - np.log(len(alpha)))


lpd_pop, lpd_mine = log_pred_density(alpha_pop), log_pred_density(alpha_mine)
print(
    f"alpha_new: population {alpha_pop.mean():.3f} ± {alpha_pop.std():.3f}, "
    f"after {K} homes {alpha_mine.mean():.3f} ± {alpha_mine.std():.3f}"
)
print(
    f"raw mean of its first {K} homes {y_new[:K].mean():.3f}, of all its homes {y_new.mean():.3f}"
)
print(
    f"log predictive density of its other {len(y_new) - K} homes: population {lpd_pop:.2f}, "
    f"personalised {lpd_mine:.2f}"
)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
bins = np.linspace(-1, 4, 81)
ax.hist(alpha_pop.numpy(), bins=bins, density=True, alpha=0.5, label="alpha_new: population")
ax.hist(
    alpha_mine.numpy(),
    bins=bins,
    density=True,
    alpha=0.6,
    label=f"alpha_new: personalised on {K} homes",
)
ax.scatter(
    y_new[:K].numpy(),
    np.zeros(K),
    color="k",
    marker="^",
    zorder=3,
    label=f"its first {K} homes (log radon)",
)
ax.set_xlabel("county intercept (log radon, basement)")
ax.legend(fontsize=8)
ax.set_title(f"new county {HELD_OUT}")
save(fig, "new_county.png")

# %%
numbers = {
    "smoke": SMOKE,
    "rounds": ROUNDS,
    "pooled_steps": POOLED_STEPS,
    "nuts_warmup": NUTS_WARMUP,
    "nuts_draws": NUTS_DRAWS,
    "globals": table,
    "raw_mean_sd": float(raw_mean.std()),
    "posterior_mean_sd": float(post_mean.std()),
    "kept_small_counties": float(np.nanmedian(kept[small])),
    "kept_large_counties": float(np.nanmedian(kept[large])),
    "alpha_pop": [float(alpha_pop.mean()), float(alpha_pop.std())],
    "alpha_personalised": [float(alpha_mine.mean()), float(alpha_mine.std())],
    "lpd_population": lpd_pop,
    "lpd_personalised": lpd_mine,
}
(OUT / "numbers.json").write_text(json.dumps(numbers, indent=2))
print(json.dumps({k: v for k, v in numbers.items() if k != "globals"}, indent=2))
