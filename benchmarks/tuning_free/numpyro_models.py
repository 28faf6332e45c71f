"""NumPyro twins of the tuning-free benchmark's models (``models/<name>.py``).

One function per model, named after its file: the same priors, likelihood, site names,
plates and shapes as the Pyro ``model``, taking the same pooled (collated) data dict, its
values as NumPy or JAX arrays (per-client values of shape ``(C,)``, per-observation values
padded to ``(C, n_max, ...)``, the boolean ``"mask"`` of shape ``(C, n_max)``). They exist
so ``reference.py`` can run NumPyro's NUTS on the pooled data; ``check_twins.py`` checks
that each twin and its Pyro model give the same joint log density. Kept out of the model
files so that those need no NumPyro (``pip install numpyro jax[cpu]`` to use these).
"""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers


def _clients(data):
    return data["mask"].shape[0]


def epil(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 5.0))
    b_trt = numpyro.sample("b_trt", dist.Normal(0.0, 2.5))
    b_base = numpyro.sample("b_base", dist.Normal(0.0, 2.5))
    b_trt_base = numpyro.sample("b_trt_base", dist.Normal(0.0, 2.5))
    b_age = numpyro.sample("b_age", dist.Normal(0.0, 2.5))
    b_v4 = numpyro.sample("b_v4", dist.Normal(0.0, 2.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    y, v4, mask = data["y"], data["v4"], data["mask"]
    trt, lbase, lage = (data[k][:, None] for k in ("trt", "lbase", "lage"))
    with numpyro.plate("clients", _clients(data), dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma))
        eta = b0 + b_trt * trt + b_base * lbase + b_trt_base * trt * lbase + b_age * lage + u
        with numpyro.plate("visits", y.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Poisson(jnp.exp(eta + b_v4 * v4)), obs=y)


def cbpp(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))
    incidence, size, mask = data["incidence"], data["size"], data["mask"]
    with numpyro.plate("clients", _clients(data), dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma))
        logits = b0 + (data["period"] * beta).sum(-1) + u
        with numpyro.plate("periods", incidence.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("incidence", dist.Binomial(size, logits=logits), obs=incidence)


def grouseticks(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 5.0))
    b_96 = numpyro.sample("b_96", dist.Normal(0.0, 2.5))
    b_97 = numpyro.sample("b_97", dist.Normal(0.0, 2.5))
    b_height = numpyro.sample("b_height", dist.Normal(0.0, 2.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    ticks, y96, y97, mask = data["ticks"], data["y96"], data["y97"], data["mask"]
    height = data["height"][:, None]
    with numpyro.plate("clients", _clients(data), dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma))
        eta = b0 + b_96 * y96 + b_97 * y97 + b_height * height + u
        with numpyro.plate("chicks", ticks.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("ticks", dist.Poisson(jnp.exp(eta)), obs=ticks)


def chickweight(data):
    a0 = numpyro.sample("a0", dist.Normal(0.0, 2.5))
    a_diet = numpyro.sample("a_diet", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    b_diet = numpyro.sample("b_diet", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    y, t, mask = data["y"], data["t"], data["mask"]
    diet = jnp.stack([data["diet2"], data["diet3"], data["diet4"]], -1)[:, None, :]
    with numpyro.plate("clients", _clients(data), dim=-2):
        a = numpyro.sample("a", dist.Normal(a0 + (diet * a_diet).sum(-1), tau_a))
        b = numpyro.sample("b", dist.Normal(b0 + (diet * b_diet).sum(-1), tau_b))
        with numpyro.plate("weighings", y.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Normal(a + b * t, sigma), obs=y)


def exam(data):
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([2]).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))
    L = numpyro.sample("L", dist.LKJCholesky(2, concentration=2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    x, y, mask = data["x"], data["y"], data["mask"]
    scale_tril = tau[..., None] * L
    with numpyro.plate("clients", _clients(data), dim=-2):
        b = numpyro.sample("b", dist.MultivariateNormal(beta, scale_tril=scale_tril))
        with numpyro.plate("pupils", y.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * x, sigma), obs=y)


def bacteria(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    b_drug = numpyro.sample("b_drug", dist.Normal(0.0, 2.5))
    b_drugplus = numpyro.sample("b_drugplus", dist.Normal(0.0, 2.5))
    b_late = numpyro.sample("b_late", dist.Normal(0.0, 2.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.5))
    y, late, mask = data["y"], data["late"], data["mask"]
    drug, drugplus = data["drug"][:, None], data["drugplus"][:, None]
    with numpyro.plate("clients", _clients(data), dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma))
        logits = b0 + b_drug * drug + b_drugplus * drugplus + b_late * late + u
        with numpyro.plate("tests", y.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def verbagg(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    b_anger = numpyro.sample("b_anger", dist.Normal(0.0, 2.5))
    b_male = numpyro.sample("b_male", dist.Normal(0.0, 2.5))
    b_scold = numpyro.sample("b_scold", dist.Normal(0.0, 2.5))
    b_shout = numpyro.sample("b_shout", dist.Normal(0.0, 2.5))
    b_self = numpyro.sample("b_self", dist.Normal(0.0, 2.5))
    b_do = numpyro.sample("b_do", dist.Normal(0.0, 2.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.5))
    r2, mask = data["r2"], data["mask"]
    anger, male = data["anger"][:, None], data["male"][:, None]
    item = (
        b_scold * data["scold"]
        + b_shout * data["shout"]
        + b_self * data["self"]
        + b_do * data["do"]
    )
    with numpyro.plate("clients", _clients(data), dim=-2):
        theta = numpyro.sample("theta", dist.Normal(0.0, sigma))
        logits = b0 + b_anger * anger + b_male * male + item + theta
        with numpyro.plate("items", r2.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("r2", dist.Bernoulli(logits=logits), obs=r2)


def noise_sd(data):
    g0 = numpyro.sample("g0", dist.Normal(0.0, 2.5))
    g_sector = numpyro.sample("g_sector", dist.Normal(0.0, 2.5))
    g_meanses = numpyro.sample("g_meanses", dist.Normal(0.0, 2.5))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    log_sigma_mu = numpyro.sample("log_sigma_mu", dist.Normal(0.0, 1.0))
    log_sigma_sd = numpyro.sample("log_sigma_sd", dist.HalfNormal(0.5))
    b_ses = numpyro.sample("b_ses", dist.Normal(0.0, 2.5))
    y, x, mask = data["y"], data["x"], data["mask"]
    sector, meanses = data["sector"][:, None], data["meanses"][:, None]
    with numpyro.plate("clients", _clients(data), dim=-2):
        mu = numpyro.sample("mu", dist.Normal(g0 + g_sector * sector + g_meanses * meanses, tau))
        sigma = numpyro.sample("sigma", dist.LogNormal(log_sigma_mu, log_sigma_sd))
        with numpyro.plate("pupils", y.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Normal(mu + b_ses * x, sigma), obs=y)


def ships(data):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    b_year = numpyro.sample("b_year", dist.Normal(0.0, 2.5).expand([3]).to_event(1))
    b_period = numpyro.sample("b_period", dist.Normal(0.0, 2.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    incidents, mask = data["incidents"], data["mask"]
    eta = data["log_exposure"] + b0 + (data["year"] * b_year).sum(-1) + b_period * data["period"]
    with numpyro.plate("clients", _clients(data), dim=-2):
        u = numpyro.sample("u", dist.Normal(0.0, sigma))
        with numpyro.plate("cells", incidents.shape[-1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("incidents", dist.Poisson(jnp.exp(eta + u)), obs=incidents)


#: The twins by model name (the model file's stem).
TWINS = {
    f.__name__: f
    for f in (
        epil,
        cbpp,
        grouseticks,
        chickweight,
        exam,
        bacteria,
        verbagg,
        noise_sd,
        ships,
    )
}
