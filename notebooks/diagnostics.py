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
# # Diagnostics: ELBO traces, leave-one-client-out, posterior predictive checks
#
# A federated fit is a variational fit, so the usual questions apply: has the optimiser
# converged, which model predicts better, does the model reproduce the data? Each has a
# federated twist: the server sees only an ELBO estimate per round; held-out prediction is
# most naturally about a *client* the federation has not seen; and the data for a
# predictive check stay on the clients unless they opt in.
#
# We use the radon model (`models/radon.py`, 85 counties as clients) and a variant without
# the county-level uranium predictor.
#
# Run: `python notebooks/diagnostics.py`, or `HBFL_SMOKE=1 python notebooks/diagnostics.py`.

# %%
import json
import os
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

warnings.filterwarnings("ignore", message="(?s).*arviz.*", category=FutureWarning)
import arviz as az  # noqa: E402

from hbfl_pyro import (  # noqa: E402
    FederatedSVI,
    compare_clients_loo,
    num_clients,
    to_inference_data,
)
from hbfl_pyro.modelfile import load_model_file  # noqa: E402

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
OUT = Path(os.environ.get("HBFL_NOTEBOOK_OUT", ROOT / "runs" / "notebooks")) / "diagnostics"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_default_dtype(torch.float64)
NUM_DRAWS = 400 if SMOKE else 2000
MARGINAL_DRAWS = 20 if SMOKE else 100


def save(fig, name: str) -> None:
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if IN_JUPYTER:
        plt.show()
    plt.close(fig)


# %% [markdown]
# ## Two models
#
# `with_uranium` is the model file's model: `alpha_j ~ Normal(g0 + g1 u_j, sigma_a)`.
# `without_uranium` drops the county-level predictor: `alpha_j ~ Normal(g0, sigma_a)`
# (the clients still hold `log_uranium`; the model simply ignores it).

# %%
# The file's default is the second-order server; this notebook shows the mean-field
# family's federated SVI (its rounds, ELBO traces and step-size settings).
radon = load_model_file(ROOT / "models" / "radon.py", guide="mean-field")
clients = radon.load_data()


def without_uranium(data):
    g0 = pyro.sample("g0", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    y, floor, mask = data["log_radon"], data["floor"], data["mask"]
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(g0, sigma_a))
        with pyro.plate("homes", y.shape[-1], dim=-1), poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(alpha + beta * floor, sigma_y), obs=y)


ROUNDS = 40 if SMOKE else radon.rounds
options = dict(radon.options)
options["lr_decay"] = options["local_lr_decay"] = 0.01 ** (1 / ROUNDS)
fits = {}
for label, model in (("with_uranium", radon.model), ("without_uranium", without_uranium)):
    fits[label] = FederatedSVI(model, clients, seed=0, **options)
    fits[label].run(ROUNDS, progress=not SMOKE)

# %% [markdown]
# ## 1. ELBO traces
#
# `fit.history` has one record per round; `"elbo"` is the server's Monte Carlo estimate of
# the ELBO from the clients that took part (here all of them). It is noisy, and its noise
# does not shrink as the fit converges, so judge convergence by the *trend* of a smoothed
# trace, and by the second half of the run on its own scale. A comparison of the mean of the
# last tenth of the rounds with the tenth before it, in units of the per-round noise, is a
# simple numerical version.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
trend = {}
for label, fit in fits.items():
    elbo = np.array([r["elbo"] for r in fit.history])
    rounds = np.arange(1, len(elbo) + 1)
    window = max(len(elbo) // 20, 2)
    smooth = np.convolve(elbo, np.ones(window) / window, mode="valid")
    axes[0].plot(rounds, elbo, lw=0.6, alpha=0.5)
    axes[0].plot(rounds[window - 1 :], smooth, label=label)
    half = len(elbo) // 2
    axes[1].plot(rounds[half:], elbo[half:], lw=0.6, alpha=0.5)
    axes[1].plot(rounds[window - 1 :][half:], smooth[half:], label=label)
    tenth = max(len(elbo) // 10, 2)
    last, before = elbo[-tenth:], elbo[-2 * tenth : -tenth]
    noise = np.std(np.diff(elbo[half:])) / np.sqrt(2)  # per-round noise, trend removed
    trend[label] = {
        "first_tenth": float(elbo[:tenth].mean()),
        "last_tenth": float(last.mean()),
        "change_last_tenth_in_noise_se": float(
            (last.mean() - before.mean()) / (noise * np.sqrt(2 / tenth))
        ),
    }
    print(
        f"{label:16s} ELBO first tenth {elbo[:tenth].mean():9.1f}, last tenth "
        f"{last.mean():9.1f}; change over the last tenth "
        f"{trend[label]['change_last_tenth_in_noise_se']:+.1f} standard errors"
    )
axes[0].set(xlabel="round", ylabel="ELBO estimate", title="whole run")
axes[1].set(xlabel="round", title="second half")
axes[0].legend()
save(fig, "elbo.png")

# %% [markdown]
# ## 2. Leave-one-client-out
#
# `to_inference_data(fit, marginal_draws=K)` asks every client for `log p(D_i | phi)` per
# posterior draw, its intercept integrated out by `K` importance draws from its own `q_i`.
# PSIS-LOO on these values estimates how well each model predicts the homes of a county the
# federation has *not* seen: the relevant question when new sites join. (The conditional
# `log p(D_i | alpha_i, phi)` would reuse an intercept learned from `D_i` itself; PSIS then
# flags many clients with Pareto k > 0.7.) `compare_clients_loo` puts both models in
# `az.compare`'s table, with `dse`, the standard error of the difference over counties.

# %%
idatas = {
    label: to_inference_data(fit, NUM_DRAWS, seed=0, marginal_draws=MARGINAL_DRAWS)
    for label, fit in fits.items()
}
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    table = compare_clients_loo(
        idatas["with_uranium"], idatas["without_uranium"], names=tuple(idatas)
    )
print(table[["elpd_loo", "p_loo", "elpd_diff", "se", "dse", "warning"]])

# %%
loo = az.loo(idatas["with_uranium"], pointwise=True)
khat = np.asarray(loo.pareto_k)
print(f"Pareto k: max {khat.max():.2f}, counties with k > 0.7: {(khat > 0.7).sum()}")
ax = az.plot_khat(loo, show_bins=True)
ax.set_title("leave-one-county-out PSIS: Pareto k per county (with uranium)")
save(ax.figure, "khat.png")

# %% [markdown]
# ## 3. Posterior predictive checks
#
# A predictive check compares the observed data with replicated data drawn from the
# fitted model. In a federation the replicated data are drawn *on each client* (from its
# own likelihood, given posterior draws); comparing them with the observed data needs the
# data, so the export includes `observed_data` only when clients opt in
# (`pointwise=True`, one flag for all clients in this simulation). Then ArviZ's tools apply
# unchanged: `az.plot_ppc` overlays the density of the observed log radon on replicated
# densities, and `az.plot_bpv` compares a test statistic.

# %%
idata_pp = to_inference_data(fits["with_uranium"], NUM_DRAWS, seed=1, pointwise=True)
print(idata_pp)
ax = az.plot_ppc(idata_pp, var_names=["y"], num_pp_samples=100, random_seed=0)
ax.set_title("posterior predictive check: log radon, all homes")
save(ax.figure, "ppc.png")

# %% [markdown]
# Test statistics. The mean is fitted by the intercepts, so it should look unremarkable
# (a p-value near 0.5). The minimum is a sharper test: the data record readings below the
# detection limit as log 0.1 = -2.3, a floor a Normal likelihood does not know about.

# %%
y_obs = idata_pp.observed_data["y"].values
y_rep = idata_pp.posterior_predictive["y"].values.reshape(-1, y_obs.size)
p_values = {}
for stat, fn in (("mean", np.mean), ("sd", np.std), ("min", np.min), ("max", np.max)):
    t_obs, t_rep = fn(y_obs), fn(y_rep, axis=1)
    p_values[stat] = float((t_rep >= t_obs).mean())
    print(
        f"T = {stat:4s}: observed {t_obs:6.3f}, replicated {t_rep.mean():6.3f} "
        f"± {t_rep.std():.3f}, p = P(T_rep >= T_obs) = {p_values[stat]:.3f}"
    )

# %%
ax = az.plot_bpv(idata_pp, kind="t_stat", t_stat="std", var_names=["y"])
ax = np.ravel(ax)[0]
ax.set_title("Bayesian p-value: sd of log radon")
save(ax.figure, "bpv_sd.png")

# %%
numbers = {
    "smoke": SMOKE,
    "rounds": ROUNDS,
    "num_draws": NUM_DRAWS,
    "marginal_draws": MARGINAL_DRAWS,
    "elbo": trend,
    "elpd_loo": {k: float(v) for k, v in table["elpd_loo"].items()},
    "elpd_diff": {k: float(v) for k, v in table["elpd_diff"].items()},
    "dse": {k: float(v) for k, v in table["dse"].items()},
    "pareto_k_max": float(khat.max()),
    "pareto_k_above_0.7": int((khat > 0.7).sum()),
    "ppc_p_values": p_values,
    "num_observations": int(y_obs.size),
}
(OUT / "numbers.json").write_text(json.dumps(numbers, indent=2))
print(json.dumps(numbers, indent=2))
