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
# # Writing your own prior (and your own guide)
#
# The library has closed-form server updates for conjugate families (Normal–Normal, the
# NIW families), but any Pyro prior works: with `server="gradient"` (what `"auto"` picks
# when no family matches) each client sends the gradient of its ELBO block with respect to
# the global variational parameters, and the server adds the gradient of
# `E_q[log p(phi) - log q(phi)]`. So a prior is just Pyro code in the model.
#
# Here we replace eight schools' Normal population distribution by a **Student-t** one,
#
#     theta_j = mu + tau * z_j,    z_j ~ StudentT(nu = 3, 0, 1)     (instead of Normal(0, 1))
#
# a robust hierarchy: a school far from the others (school A reports 28 ± 15) is treated as
# a possible outlier and shrunk less, and it pulls `mu` and `tau` less. We fit it federated,
# compare it with the Normal prior on the same clients (posteriors and leave-one-school-out
# predictive accuracy), and then plug in hand-written guides: a global guide module and a
# local guide with a heavy-tailed (Student-t) variational family. Last, a **horseshoe**
# prior: a global scale times a per-school scale, local latent variables of their own.
#
# Run: `python notebooks/custom_prior.py`, or `HBFL_SMOKE=1 python notebooks/custom_prior.py`.

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
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

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
        if (folder / "models" / "eight_schools.py").exists():
            return folder
    raise FileNotFoundError("run this notebook from inside the hbfl_pyro repository")


ROOT = _repo_root()
OUT = Path(os.environ.get("HBFL_NOTEBOOK_OUT", ROOT / "runs" / "notebooks")) / "custom_prior"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_default_dtype(torch.float64)
NUM_DRAWS = 1000 if SMOKE else 4000
MARGINAL_DRAWS = 20 if SMOKE else 100  # importance draws per client for client-level LOO


def save(fig, name: str) -> None:
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if IN_JUPYTER:
        plt.show()
    plt.close(fig)


# %% [markdown]
# ## The model: a Student-t population distribution
#
# The only requirements the library puts on a model: it takes one collated data dict, its
# global sites sit outside a plate named `"clients"` and its local and observed sites
# inside it (`num_clients(data)` gives the plate's size). Everything else is Pyro.

# %%
NU = 3.0


def student_t_schools(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("clients", num_clients(data)):
        z = pyro.sample("z", dist.StudentT(NU, 0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * z)
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


eight = load_model_file(ROOT / "models" / "eight_schools.py", guide="mean-field")
clients = eight.load_data()
ROUNDS = 150 if SMOKE else eight.rounds
# The mean-field settings tests/test_fed_vs_pooled.py validates (each fit below names
# its own guides).
options = {k: v for k, v in eight.options.items() if k not in ("global_guide", "local_guide")}
options["lr_decay"] = options["local_lr_decay"] = 0.01 ** (1 / ROUNDS)
# All schools of a round in one batched computation: the same updates as the per-client
# loop (tests/test_vectorised.py), a few times faster in simulation.
options["engine"] = "vectorised"

fit_t = FederatedSVI(student_t_schools, clients, seed=0, **options)
print("server mode:", fit_t.server.mode, "(no conjugate family for a Student-t prior)")
print(
    "global:",
    fit_t.structure.global_sites,
    "local:",
    fit_t.structure.local_sites,
    "deterministic:",
    fit_t.structure.deterministic_sites,
)
fit_t.run(ROUNDS, progress=not SMOKE)

# %% [markdown]
# The Normal prior, same clients and settings: the model file's non-centred model.

# %%
fit_n = FederatedSVI(eight.model, clients, seed=0, **options)
fit_n.run(ROUNDS, progress=not SMOKE)

# %% [markdown]
# ## Posteriors under the two priors
#
# `to_inference_data(..., marginal_draws=K)` also records each school's
# `log p(y_j | mu, tau)`, its local effect integrated out by importance sampling from its
# own `q_j`: what leave-one-*school*-out needs.

# %%
idata_n = to_inference_data(fit_n, NUM_DRAWS, seed=0, marginal_draws=MARGINAL_DRAWS)
idata_t = to_inference_data(fit_t, NUM_DRAWS, seed=0, marginal_draws=MARGINAL_DRAWS)
summary = {}
for label, idata in (("normal", idata_n), ("student_t", idata_t)):
    stats = az.summary(idata, var_names=["mu", "tau", "theta"], kind="stats")
    summary[label] = stats
    print(f"--- {label} prior\n{stats[['mean', 'sd']].T.round(2)}")

# %%
axes = az.plot_forest(
    [idata_n, idata_t],
    model_names=["Normal prior", f"Student-t({NU:g}) prior"],
    var_names=["mu", "tau", "theta"],
    combined=True,
    hdi_prob=0.9,
    figsize=(7, 6),
)
axes[0].set_title("eight schools: Normal vs Student-t population (90% intervals)")
save(axes[0].figure, "prior_forest.png")

# %% [markdown]
# ## Which prior predicts a left-out school better?
#
# `compare_clients_loo` runs `az.compare` with one "observation" per school (its whole data
# set). With eight schools the differences are small against their standard errors (`dse`),
# which is the honest answer: these data cannot tell the two population shapes apart.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # Pareto-k notes; see the `warning` column
    loo_table = compare_clients_loo(idata_n, idata_t, names=("normal", "student_t"))
print(loo_table[["elpd_loo", "p_loo", "elpd_diff", "dse", "warning"]])

# %% [markdown]
# ## Plugging in your own guides
#
# `global_guide=` and `local_guide=` take an autoguide class or your own `PyroModule` with
# the model's signature: the global guide samples the global sites; the local guide the
# local sites inside the `clients` plate. The library gives every client a private copy of
# the local module (each built for one client, so its parameters have the shape of *one*
# client's sites) and checks up front that the guides cover the model's latent sites.
#
# Under a Student-t prior the posterior of a school's `z_j` can be heavy-tailed, so here the
# local factor is itself a Student-t with a learned location, scale and degrees of freedom
# (torch's `StudentT` is reparameterisable, including in `df`). The global guide writes out
# what `AutoNormal` would do: a Normal for `mu` and a log-normal for `tau`.


# %%
class GlobalGuide(PyroModule):
    """q(mu, tau) = Normal(mu; m, s) LogNormal(tau; a, b)."""

    def __init__(self):
        super().__init__()
        self.mu_loc = PyroParam(torch.tensor(0.0))
        self.mu_scale = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.log_tau_loc = PyroParam(torch.tensor(0.0))
        self.log_tau_scale = PyroParam(torch.tensor(0.5), constraint=constraints.positive)

    def forward(self, data):
        pyro.sample("mu", dist.Normal(self.mu_loc, self.mu_scale))
        pyro.sample("tau", dist.LogNormal(self.log_tau_loc, self.log_tau_scale))


class StudentTLocalGuide(PyroModule):
    """q_j(z_j) = StudentT(df_j, loc_j, scale_j), one client's factor (shapes: one client)."""

    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(1))
        self.scale = PyroParam(torch.full((1,), 0.5), constraint=constraints.positive)
        # df > 2 keeps the variance finite, so Monte Carlo gradients stay well behaved.
        self.df = PyroParam(torch.full((1,), 10.0), constraint=constraints.greater_than(2.0))

    def forward(self, data):
        with pyro.plate("clients", num_clients(data)):
            pyro.sample("z", dist.StudentT(self.df, self.loc, self.scale))


fit_custom = FederatedSVI(
    student_t_schools,
    clients,
    global_guide=GlobalGuide(),
    local_guide=StudentTLocalGuide(),
    seed=0,
    # The vectorised engine stacks autoguide parameters across clients; a hand-written
    # local module runs on the per-client (in-process) engine.
    **(options | {"engine": "inprocess"}),
)
fit_custom.run(ROUNDS, progress=not SMOKE)
# Each client's own factor: its parameters live in that client's module, nowhere else.
for name in ("A", "E"):
    guide = fit_custom.clients[name].local_guide
    print(
        f"school {name}: q(z) = StudentT(df={guide.df.item():.1f}, "
        f"loc={guide.loc.item():.2f}, scale={guide.scale.item():.2f})"
    )

# %%
g_normal = fit_n.global_samples(NUM_DRAWS)
g_auto, g_custom = fit_t.global_samples(NUM_DRAWS), fit_custom.global_samples(NUM_DRAWS)
print(f"{'':22s} {'mu':>14s} {'tau':>14s}")
for label, g in (("AutoNormal guides", g_auto), ("hand-written guides", g_custom)):
    print(
        f"{label:22s} {g['mu'].mean():6.2f} ± {g['mu'].std():5.2f} "
        f"{g['tau'].mean():6.2f} ± {g['tau'].std():5.2f}"
    )
idata_custom = to_inference_data(fit_custom, NUM_DRAWS, seed=0)

# %%
fig, ax = plt.subplots(figsize=(7, 4))
names = list(clients)
x = np.arange(len(names))
y_obs = np.array([float(clients[c]["y"]) for c in names])
for k, (label, idata) in enumerate(
    (
        ("Normal prior", idata_n),
        ("Student-t prior", idata_t),
        ("Student-t, own guides", idata_custom),
    )
):
    theta = idata.posterior["theta"].values.reshape(-1, len(names))
    ax.errorbar(
        x + 0.15 * (k - 1), theta.mean(0), yerr=theta.std(0), fmt="o", capsize=2, label=label
    )
ax.scatter(x, y_obs, color="k", marker="x", label="school's own estimate y")
ax.set_xticks(x, names)
ax.set_ylabel("theta (mean ± sd)")
ax.legend(fontsize=8)
ax.set_title("school effects under the two priors")
save(fig, "school_effects.png")

# %% [markdown]
# ## A horseshoe population: global shrinkage, local escape
#
# The horseshoe (Carvalho, Polson & Scott 2010) gives every school its own scale
# `lambda_j ~ HalfCauchy(1)` on top of the global `tau`:
#
#     theta_j = mu + tau * lambda_j * z_j,    z_j ~ Normal(0, 1),    lambda_j ~ HalfCauchy(1)
#
# Most schools are pulled hard towards `mu` (small `tau`), while a school whose data insist
# can escape through a large `lambda_j`. Both `lambda_j` and `z_j` are *local*: they live
# on school j's client and never leave it; the server sees only `mu` and `tau`. The guides
# are the library's defaults, `AutoNormal` for `q(mu, tau)` and for each `q_j(lambda_j,
# z_j)` (a log-normal for `lambda_j`), with the gradient server (no conjugate family).


# %%
def horseshoe_schools(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("clients", num_clients(data)):
        lam = pyro.sample("lambda", dist.HalfCauchy(1.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * lam * z)
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


fit_hs = FederatedSVI(horseshoe_schools, clients, seed=0, **options)
print("local sites:", fit_hs.structure.local_sites, "| server:", fit_hs.server.mode)
fit_hs.run(ROUNDS, progress=not SMOKE)
idata_hs = to_inference_data(fit_hs, NUM_DRAWS, seed=0)
print(az.summary(idata_hs, var_names=["mu", "tau", "lambda"], kind="stats")[["mean", "sd"]])

# %%
theta_hs = idata_hs.posterior["theta"].values.reshape(-1, len(names))
lam_hs = idata_hs.posterior["lambda"].values.reshape(-1, len(names))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
mu_hs = float(idata_hs.posterior["mu"].mean())
theta_n_mean = idata_n.posterior["theta"].values.reshape(-1, len(names)).mean(0)
ax1.scatter(y_obs, theta_n_mean, label="Normal prior")
ax1.scatter(y_obs, theta_hs.mean(0), marker="s", label="horseshoe prior")
ax1.axline((0, 0), slope=1, color="grey", lw=0.8, label="no shrinkage")
ax1.axhline(mu_hs, color="k", ls=":", lw=0.8, label="E[mu], horseshoe")
ax1.set_ylim(y_obs.min() - 2, y_obs.max() + 2)  # same range as x: shrinkage is visible
ax1.set_xlabel("school's own estimate y")
ax1.set_ylabel("posterior mean of theta")
ax1.legend(fontsize=8)
ax1.set_title("shrinkage towards mu")
ax2.bar(x, np.median(lam_hs, 0))
ax2.set_xticks(x, names)
ax2.set_ylabel("posterior median of lambda_j")
ax2.set_title("per-school scales (local, never sent)")
save(fig, "horseshoe.png")

# %%
theta_n = idata_n.posterior["theta"].values.reshape(-1, len(names))
theta_t = idata_t.posterior["theta"].values.reshape(-1, len(names))
theta_c = idata_custom.posterior["theta"].values.reshape(-1, len(names))
numbers = {
    "smoke": SMOKE,
    "rounds": ROUNDS,
    "nu": NU,
    "normal": {
        "mu": float(g_normal["mu"].mean()),
        "tau": float(g_normal["tau"].mean()),
        "theta_mean": theta_n.mean(0).tolist(),
    },
    "student_t": {
        "mu": float(g_auto["mu"].mean()),
        "tau": float(g_auto["tau"].mean()),
        "theta_mean": theta_t.mean(0).tolist(),
    },
    "custom_guides": {
        "mu": float(g_custom["mu"].mean()),
        "tau": float(g_custom["tau"].mean()),
        "mu_sd": float(g_custom["mu"].std()),
        "theta_mean": theta_c.mean(0).tolist(),
        "df": [fit_custom.clients[c].local_guide.df.item() for c in names],
    },
    "horseshoe": {
        "mu": mu_hs,
        "tau_median": float(np.median(idata_hs.posterior["tau"].values)),
        "lambda_median": np.median(lam_hs, 0).tolist(),
        "theta_mean": theta_hs.mean(0).tolist(),
    },
    "elpd_loo": {k: float(v) for k, v in loo_table["elpd_loo"].items()},
    "elpd_dse": float(loo_table["dse"].max()),
    "y": y_obs.tolist(),
}
(OUT / "numbers.json").write_text(json.dumps(numbers, indent=2))
print(json.dumps(numbers, indent=2))
