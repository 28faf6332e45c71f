"""Nothing wrong passes quietly (issue 14): one table of bad inputs, each refused up front.

Every row builds one bad input -- an option of :class:`FederatedSVI` or ``run()``, a
:class:`DPConfig`, client data, a model, a model file, a checkpoint or a command line --
and hands it to the library. Each must raise the library's error (its type is the row's),
whose message names the culprit (the row's regex: the option and value, or the client,
the site and the index, or the file and the key), and no round may have run: no
``FederatedSVI.step`` was called and every fit the row built is still at round 0 with an
empty history.
"""

import contextlib
import io
import re
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import hbfl_pyro.svi
from hbfl_pyro import (
    DataValidationError,
    FederatedSVI,
    ModelStructureError,
    num_clients,
)
from hbfl_pyro.checkpoint import CheckpointError
from hbfl_pyro.cli import main
from hbfl_pyro.dp import DPConfig
from hbfl_pyro.modelfile import ModelFileError, load_model_file

# ---------------------------------------------------------------------- tiny models, data
FAST = dict(local_steps=1, grad_particles=2, server_particles=2)


def _no_plate(data):
    """Every client's data in one plate-free likelihood: no clients plate to find."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    pyro.sample("y", dist.Normal(mu, 1.0).expand(data["y"].shape).to_event(2), obs=data["y"])


def _discrete_local(data):
    """Each client in one of two latent classes: a discrete local, as enumeration writes it."""
    w = pyro.sample("w", dist.Beta(1.0, 1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        z = pyro.sample("z", dist.Bernoulli(w), infer={"enumerate": "parallel"})
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", dist.Normal(2.0 * z, 1.0), obs=data["y"])


def _normal(data):
    """Normal-normal with ragged clients, the padding masked (the library's idiom)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])


def _likelihood_model(make):
    """A model whose observations follow ``make(theta)`` (masked as they should be)."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("clients", num_clients(data), dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 0.5))
            with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
                pyro.sample("y", make(theta), obs=data["y"])

    return model


_gamma = _likelihood_model(lambda t: dist.Gamma(2.0, t.exp()))
_poisson = _likelihood_model(lambda t: dist.Poisson(t.exp()))
_bernoulli = _likelihood_model(lambda t: dist.Bernoulli(logits=t))
_beta = _likelihood_model(lambda t: dist.Beta(t.exp(), 1.0))
_binomial = _likelihood_model(lambda t: dist.Binomial(5, logits=t))
_exponential = _likelihood_model(lambda t: dist.Exponential(t.exp()))


def _unmasked(data):
    """Normal-normal that forgets ``poutine.mask``: it would fit the padding as data."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=data["y"])


def _unmasked_regression(data):
    """A regression that forgets the mask: the padding of x and y enters the likelihood."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1):
            pyro.sample("y", dist.Normal(alpha + beta * data["x"], 1.0), obs=data["y"])


def _per_client_scale(data):
    """Eight-schools-like: one observation per client with a known standard error."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("clients", num_clients(data)):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, data["sigma"]), obs=data["y"])


def _no_observations(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("clients", num_clients(data)):
        pyro.sample("theta", dist.Normal(mu, 2.0))


def _observed_outside(data):
    _normal(data)
    pyro.sample("anchor", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def _data(values=None, sizes=(3, 4, 2)):
    """Three ragged clients ``a``, ``b``, ``c``; ``values`` replaces client ``b``'s y."""
    gen = torch.Generator().manual_seed(0)
    out = {name: {"y": 1.0 + torch.rand(n, generator=gen)} for name, n in zip("abc", sizes)}
    if values is not None:
        out["b"] = {"y": values}
    return out


def _binary(b_values):
    return {
        "a": {"y": torch.tensor([1.0, 0.0, 0.0])},
        "b": {"y": torch.tensor(b_values)},
        "c": {"y": torch.tensor([0.0, 1.0])},
    }


def _regression(data):
    """A masked regression: the global slope enters the likelihood."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", dist.Normal(alpha + beta * data["x"], 1.0), obs=data["y"])


def _covariates(sizes=(2, 4)):
    return {k: {"x": torch.arange(n) * 1.0, "y": torch.ones(n)} for k, n in zip("ab", sizes)}


def _counts(b_values):
    return {
        "a": {"y": torch.tensor([1.0, 0.0, 2.0])},
        "b": {"y": torch.tensor(b_values)},
        "c": {"y": torch.tensor([3.0, 1.0])},
    }


# ---------------------------------------------------------------------- callers
#: Every fit a row builds, to check afterwards that none ran a round.
_FITS = []


def _svi(model=_normal, data=None, **options):
    fit = FederatedSVI(model, _data() if data is None else data, **options)
    _FITS.append(fit)
    return fit


def _run(*args, **kwargs):
    """A valid fit, then ``run`` with bad arguments."""
    return _svi(**FAST).run(*args, **kwargs)


def _run_first_order(*args, **kwargs):
    return _svi(server="gradient", **FAST).run(*args, **kwargs)


class CLIError(Exception):
    """``hbfl`` exited non-zero; the message is what it printed on stderr."""


def _cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(["fit", *map(str, argv), "--no-progress", "--no-report"])
        except SystemExit as exc:  # argparse: bad usage
            status = exc.code
    if status != 0:
        raise CLIError(err.getvalue())
    raise AssertionError(f"hbfl fit {argv} succeeded")


MODEL_FILE = """
import pyro, pyro.distributions as dist, torch
from pyro import poutine
from hbfl_pyro import num_clients

def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("clients", num_clients(data), dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        with pyro.plate("obs", data["y"].shape[-1], dim=-1), poutine.mask(mask=data["mask"]):
            pyro.sample("y", {likelihood}, obs=data["y"])

def load_data():
    return {{"a": {{"y": torch.tensor([1.0, 2.0, 3.0])}}, "b": {{"y": torch.tensor({b})}}}}

fit_options = {fit_options}
{extra}
"""


def _file(tmp_path, fit_options='{"rounds": 2}', extra="", b="[0.5, 1.5]", likelihood=None):
    path = tmp_path / "user_model.py"
    text = MODEL_FILE.format(
        fit_options=fit_options,
        extra=textwrap.dedent(extra),
        b=b,
        likelihood=likelihood or "dist.Normal(theta, 1.0)",
    )
    path.write_text(text)
    return path


def _load(tmp_path, guide=None, **file):
    return load_model_file(_file(tmp_path, **file), guide=guide)


def _resume_from(tmp_path, write):
    """A valid fit resuming from the file ``write(path)`` leaves."""
    path = tmp_path / "ckpt.pt"
    write(path)
    _svi(**FAST).resume(path)


def _other_models_checkpoint(path):
    other = FederatedSVI(_per_client_scale, _scales(), **FAST)
    other.checkpoint(path)


def _truncated_checkpoint(path):
    _svi(**FAST).checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])


def _scales(sigma_b=2.0):
    return {
        "a": {"y": torch.tensor(1.0), "sigma": torch.tensor(1.0)},
        "b": {"y": torch.tensor(-0.5), "sigma": torch.tensor(sigma_b)},
        "c": {"y": torch.tensor(0.3), "sigma": torch.tensor(1.5)},
    }


# ---------------------------------------------------------------------- the table
V, T = ValueError, TypeError
D, M, F = DataValidationError, ModelStructureError, ModelFileError
nan, inf = float("nan"), float("inf")


def case(id, build, error, pattern):
    return pytest.param(build, error, pattern, id=id)


CASES = [
    # --- issue 14, accepted silently before
    case("run(-5)", lambda tmp: _run(-5), V, r"rounds must be an integer >= 0.*got -5"),
    case("local_steps=0", lambda tmp: _svi(local_steps=0), V, r"local_steps .*>= 1.*got 0"),
    case("local_steps=-3", lambda tmp: _svi(local_steps=-3), V, r"local_steps .*got -3"),
    case("server_lr=0", lambda tmp: _svi(server_lr=0), V, r"server_lr must be .*> 0.*got 0"),
    case("lr_decay=-0.5", lambda tmp: _svi(lr_decay=-0.5), V, r"lr_decay .*\(0, 1\].*got -0.5"),
    case("seed='abc'", lambda tmp: _svi(seed="abc"), T, r"seed must be an integer.*got 'abc'"),
    case("seed=None", lambda tmp: _svi(seed=None), T, r"seed must be an integer.*got None"),
    case(
        "model ignores the mask",
        lambda tmp: _svi(_unmasked),
        M,
        r"client 'c' has 2 observations.*padding.*poutine\.mask\(mask=data\['mask'\]\)",
    ),
    case(
        "guide_options misspelled key",
        lambda tmp: _load(tmp, extra='guide_options = {"structured": {"lcoal_lr": 0.1}}'),
        F,
        r"guide_options\['structured'\] \['lcoal_lr'\] \(did you mean 'local_lr'\?\)",
    ),
    case(
        "negative value into a Gamma",
        lambda tmp: _svi(_gamma, _data(torch.tensor([1.0, -2.0, 3.0, 4.0]))),
        D,
        r"client 'b', observed site 'y' \(data key 'y'\).*support of its Gamma.*index \(1,\)",
    ),
    case(
        "values of 1e200",
        lambda tmp: _svi(data=_data(torch.tensor([1.0, 2.0, 1e200, 4.0]))),
        D,
        r"client 'b', key 'y'.*magnitude.*index \(2,\).*overflows",
    ),
    # --- issue 14, caught too late or in torch's words before
    case(
        "non-integer counts into a Poisson",
        lambda tmp: _svi(_poisson, _counts([1.0, 2.5, 0.0, 4.0])),
        D,
        r"client 'b', observed site 'y'.*Poisson.*index \(1,\) \(value 2.5\)",
    ),
    case(
        "complex observations",
        lambda tmp: _svi(data={k: {"y": v["y"] + 1j} for k, v in _data().items()}),
        D,
        r"client 'a', observed site 'y'.*dtype torch.complex",
    ),
    case(
        "one client complex",
        lambda tmp: _svi(data=_data(torch.tensor([1.0, 2.0, 3.0, 4.0]) + 1j)),
        D,
        r"client 'b', key 'y': dtype torch.complex128 does not match",
    ),
    case(
        "bool observations",
        lambda tmp: _svi(
            _bernoulli,
            {k: {"y": torch.tensor([True, False, True])[: 2 + i % 2]} for i, k in enumerate("abc")},
        ),
        D,
        r"client 'a', observed site 'y'.*dtype torch.bool.*float\(\)",
    ),
    case("run(2.5)", lambda tmp: _run(2.5), T, r"rounds must be an integer.*got 2.5"),
    case("local_lr=inf", lambda tmp: _svi(local_lr=inf), V, r"local_lr must be a finite.*got inf"),
    case("num_particles=0", lambda tmp: _svi(num_particles=0), V, r"num_particles .*got 0"),
    case("grad_particles=0", lambda tmp: _svi(grad_particles=0), V, r"grad_particles .*got 0"),
    case("local_steps='10'", lambda tmp: _svi(local_steps="10"), T, r"local_steps .*got '10'"),
    case("server_lr='0.1'", lambda tmp: _svi(server_lr="0.1"), T, r"server_lr .*got '0.1'"),
    case(
        "string data",
        lambda tmp: _svi(data={"a": {"y": ["1", "2"]}, "b": {"y": ["3"]}}),
        D,
        r"client 'a', key 'y': values of dtype <U1 are not numbers",
    ),
    # --- FederatedSVI options
    case("local_steps=2.5", lambda tmp: _svi(local_steps=2.5), T, r"local_steps .*got 2.5"),
    case("local_steps=True", lambda tmp: _svi(local_steps=True), T, r"local_steps .*got True"),
    case("server_lr=-0.1", lambda tmp: _svi(server_lr=-0.1), V, r"server_lr .*got -0.1"),
    case("server_lr=nan", lambda tmp: _svi(server_lr=nan), V, r"server_lr .*finite.*got nan"),
    case("local_lr=0", lambda tmp: _svi(local_lr=0.0), V, r"local_lr .*> 0.*got 0.0"),
    case("lr_decay=0", lambda tmp: _svi(lr_decay=0), V, r"lr_decay .*\(0, 1\].*got 0"),
    case("lr_decay=1.5", lambda tmp: _svi(lr_decay=1.5), V, r"lr_decay .*got 1.5"),
    case("local_lr_decay=2", lambda tmp: _svi(local_lr_decay=2.0), V, r"local_lr_decay .*2.0"),
    case("server_particles=0", lambda tmp: _svi(server_particles=0), V, r"server_particles"),
    case("num_particles=1.0", lambda tmp: _svi(num_particles=1.0), T, r"num_particles .*1.0"),
    case("grad_particles=True", lambda tmp: _svi(grad_particles=True), T, r"grad_particles"),
    case("moment_matched='yes'", lambda tmp: _svi(moment_matched="yes"), T, r"moment_matched"),
    case("seed=-1", lambda tmp: _svi(seed=-1), V, r"seed must be an integer >= 0.*got -1"),
    case("seed=1.5", lambda tmp: _svi(seed=1.5), T, r"seed must be an integer.*got 1.5"),
    case("fraction=0", lambda tmp: _svi(fraction=0.0), V, r"fraction .*\(0, 1\].*got 0.0"),
    case("fraction=1.5", lambda tmp: _svi(fraction=1.5), V, r"fraction .*got 1.5"),
    case("fraction=nan", lambda tmp: _svi(fraction=nan), V, r"fraction .*got nan"),
    case("fraction='all'", lambda tmp: _svi(fraction="all"), T, r"fraction .*got 'all'"),
    case("min_clients=0", lambda tmp: _svi(min_clients=0), V, r"min_clients .*got 0"),
    case("min_clients=4 of 3", lambda tmp: _svi(min_clients=4), V, r"min_clients .*3.*got 4"),
    case("min_clients=1.0", lambda tmp: _svi(min_clients=1.0), T, r"min_clients .*got 1.0"),
    case("participation='all'", lambda tmp: _svi(participation="all"), V, r"participation"),
    case("tol=0", lambda tmp: _svi(tol=0.0), V, r"tol must be .*> 0.*got 0.0"),
    case("tol=-1e-3", lambda tmp: _svi(tol=-1e-3), V, r"tol .*got -0.001"),
    case("psis_draws=0", lambda tmp: _svi(psis_draws=0), V, r"psis_draws .*>= 100.*got 0"),
    case("psis_draws=500.5", lambda tmp: _svi(psis_draws=500.5), T, r"psis_draws .*500.5"),
    case("local_draws=-1", lambda tmp: _svi(local_draws=-1), V, r"local_draws .*>= 0.*got -1"),
    case("plate=''", lambda tmp: _svi(plate=""), V, r"plate must be a non-empty string"),
    case("plate=3", lambda tmp: _svi(plate=3), T, r"plate must be a non-empty string.*got 3"),
    case("engine='gpu'", lambda tmp: _svi(engine="gpu"), V, r"engine must be one of.*'gpu'"),
    case("server='exact'", lambda tmp: _svi(server="exact"), V, r"server must be .*'exact'"),
    case("on_message='print'", lambda tmp: _svi(on_message="print"), T, r"on_message"),
    case("dp as a dict", lambda tmp: _svi(dp={"clip": 1.0}), T, r"dp must be a .*DPConfig"),
    case("model not callable", lambda tmp: _svi("model.py"), T, r"model must be a callable"),
    case(
        "second-order with step sizes",
        lambda tmp: _svi(_per_client_scale, _scales(), server="second_order", local_lr=0.1),
        V,
        r"second-order server takes no step sizes.*local_lr",
    ),
    # --- run()
    case("run('3')", lambda tmp: _run("3"), T, r"rounds must be an integer.*got '3'"),
    case("run(True)", lambda tmp: _run(True), T, r"rounds must be an integer.*got True"),
    case("run(progress='no')", lambda tmp: _run(2, progress="no"), T, r"progress .*got 'no'"),
    case("run(on_round=5)", lambda tmp: _run(2, on_round=5), T, r"on_round must be a callable"),
    # --- DPConfig
    case("dp clip=0", lambda tmp: DPConfig(clip=0.0, noise_multiplier=1.0), V, r"clip .*> 0"),
    case("dp clip=True", lambda tmp: DPConfig(clip=True, noise_multiplier=1), T, r"clip .*True"),
    case("dp clip='1'", lambda tmp: DPConfig(clip="1", noise_multiplier=1), T, r"clip .*'1'"),
    case("dp delta=0", lambda tmp: DPConfig(clip=1, noise_multiplier=1, delta=0.0), V, r"delta"),
    case(
        "dp delta='1e-5'",
        lambda tmp: DPConfig(clip=1, noise_multiplier=1, delta="1e-5"),
        T,
        r"delta must be in \(0, 1\).*got '1e-5'",
    ),
    case("dp noise=-1", lambda tmp: DPConfig(clip=1, noise_multiplier=-1), V, r"noise_multiplier"),
    case("dp noise=inf", lambda tmp: DPConfig(clip=1, noise_multiplier=inf), V, r"got inf"),
    case(
        "dp target_epsilon=inf",
        lambda tmp: DPConfig(clip=1, target_epsilon=inf, rounds=3),
        V,
        r"target_epsilon must be > 0.*got inf",
    ),
    case(
        "dp rounds=2.5",
        lambda tmp: DPConfig(clip=1, target_epsilon=1.0, rounds=2.5),
        T,
        r"rounds must be an integer >= 1.*got 2.5",
    ),
    case("dp no rounds", lambda tmp: DPConfig(clip=1, target_epsilon=1.0), V, r"needs rounds="),
    case(
        "dp accountant='rdp'",
        lambda tmp: DPConfig(clip=1, noise_multiplier=1, accountant="rdp"),
        V,
        r"accountant must be .*'rdp'",
    ),
    case(
        "dp reproducible_noise='yes'",
        lambda tmp: DPConfig(clip=1, noise_multiplier=1, reproducible_noise="yes"),
        T,
        r"reproducible_noise must be True or False.*'yes'",
    ),
    case(
        "dp both noise and target",
        lambda tmp: DPConfig(clip=1, noise_multiplier=1, target_epsilon=1, rounds=2),
        V,
        r"exactly one of noise_multiplier",
    ),
    # --- data
    case(
        "negative counts into a Poisson",
        lambda tmp: _svi(_poisson, _counts([1.0, 2.0, -1.0])),
        D,
        r"client 'b', observed site 'y'.*Poisson.*index \(2,\) \(value -1.0\)",
    ),
    case(
        "outcome 2 into a Bernoulli",
        lambda tmp: _svi(_bernoulli, _binary([1.0, 0.0, 2.0, 1.0])),
        D,
        r"client 'b', observed site 'y'.*Bernoulli.*index \(2,\)",
    ),
    case(
        "value 1.5 into a Beta",
        lambda tmp: _svi(_beta, _binary([0.5, 0.2, 1.5])),
        D,
        r"client 'b', observed site 'y'.*Beta.*index \(2,\) \(value 1.5\)",
    ),
    case(
        "count above total_count into a Binomial",
        lambda tmp: _svi(_binomial, _counts([1.0, 6.0])),
        D,
        r"client 'b', observed site 'y'.*Binomial.*index \(1,\) \(value 6.0\)",
    ),
    case(
        "negative waiting time into an Exponential",
        lambda tmp: _svi(_exponential, _data(torch.tensor([-0.5, 0.2]))),
        D,
        r"client 'b', observed site 'y'.*Exponential.*index \(0,\)",
    ),
    case(
        "negative standard error",
        lambda tmp: _svi(_per_client_scale, _scales(sigma_b=-2.0)),
        M,
        r"client 'b'.*scale",
    ),
    case(
        "NaN observation",
        lambda tmp: _svi(data=_data(torch.tensor([1.0, nan]))),
        D,
        r"client 'b', key 'y'.*NaN or Inf.*index \(1,\)",
    ),
    case(
        "Inf observation",
        lambda tmp: _svi(data=_data(torch.tensor([inf, 1.0]))),
        D,
        r"client 'b', key 'y'.*NaN or Inf.*index \(0,\)",
    ),
    case(
        "empty client",
        lambda tmp: _svi(data=_data(torch.tensor([]))),
        D,
        r"client 'b' is empty \(0 observations\)",
    ),
    case(
        "client without keys",
        lambda tmp: _svi(data={**_data(), "b": {}}),
        D,
        r"client 'b' has no data",
    ),
    case(
        "clients with different keys",
        lambda tmp: _svi(data={**_data(), "b": {"z": torch.ones(2)}}),
        D,
        r"client 'b' has keys \['z'\].*missing \['y'\]",
    ),
    case(
        "reserved key 'mask'",
        lambda tmp: _svi(data={**_data(), "b": {"y": torch.ones(2), "mask": torch.ones(2)}}),
        D,
        r"client 'b': the key 'mask' is reserved",
    ),
    case(
        "client data not a mapping",
        lambda tmp: _svi(data={**_data(), "b": [1.0, 2.0]}),
        D,
        r"client 'b': data must be a mapping",
    ),
    case(
        "ragged nested lists",
        lambda tmp: _svi(data={**_data(), "b": {"y": [[1.0, 2.0], [3.0]]}}),
        D,
        r"client 'b', key 'y': (values are ragged|cannot convert list)",
    ),
    case("no clients", lambda tmp: _svi(data={}), D, r"no clients"),
    case(
        "integer and float clients",
        lambda tmp: _svi(data={**_data(), "b": {"y": torch.tensor([1, 2])}}),
        D,
        r"client 'b', key 'y': dtype torch.int64 does not match",
    ),
    case(
        "unknown per_client key",
        lambda tmp: _svi(data=_data(), per_client=("sigma",)),
        D,
        r"per_client key\(s\) \['sigma'\]",
    ),
    # --- model structure
    case(
        "regression ignores the mask",
        lambda tmp: _svi(
            _unmasked_regression,
            _covariates(),
        ),
        M,
        r"client 'a' has 2 observations, padded to 4 with 'b'.*poutine\.mask",
    ),
    case(
        "no clients plate",
        lambda tmp: _svi(_normal, plate="groups"),
        M,
        # the model's own plate 'clients' is named as the fix
        r"no sample site is inside a plate named 'groups'; the model's plate 'clients' has "
        r"one entry per client: rename it 'groups', or .*plate='clients'",
    ),
    case(
        "no plate at all",
        lambda tmp: _svi(_no_plate),
        M,
        r"no sample site is inside a plate named 'clients'; wrap the per-client part",
    ),
    case(
        "discrete latent site",
        lambda tmp: _svi(_discrete_local),
        M,
        r"local site 'z' is discrete \(Boolean\(\)\).*Sum it out in the model",
    ),
    case("no observed site", lambda tmp: _svi(_no_observations), M, r"no observed site"),
    case(
        "observed site outside the plate",
        lambda tmp: _svi(_observed_outside),
        M,
        r"observed site 'anchor' is outside the 'clients' plate",
    ),
    case(
        "model crashes on the data",
        lambda tmp: _svi(lambda data: data["sd"], _data()),
        M,
        r"client 'a'.*KeyError.*'sd'",
    ),
    case(
        "closed form impossible",
        lambda tmp: _svi(_regression, _covariates(), server="closed_form"),
        M,
        r"server='closed_form' is not possible: global site\(s\) \['beta'\]",
    ),
    # --- model files
    case(
        "missing model file",
        lambda tmp: load_model_file(tmp / "nowhere.py"),
        F,
        r"model file '.*nowhere\.py' not found",
    ),
    case(
        "misspelled fit_options key",
        lambda tmp: _load(tmp, fit_options='{"rounds": 2, "local_step": 1}'),
        F,
        r"unknown fit_options \['local_step'\] \(did you mean 'local_steps'\?\)",
    ),
    case(
        "misspelled rounds key",
        lambda tmp: _load(tmp, fit_options='{"round": 2}'),
        F,
        r"unknown fit_options \['round'\] \(did you mean 'rounds'\?\)",
    ),
    case(
        "fit_options value out of range",
        lambda tmp: _load(tmp, fit_options='{"rounds": 2, "server_lr": -1.0}'),
        F,
        r"user_model\.py: fit_options: server_lr must be .*> 0.*got -1.0",
    ),
    case(
        "fit_options value of the wrong kind",
        lambda tmp: _load(tmp, fit_options='{"rounds": 2, "seed": "abc"}'),
        F,
        r"fit_options: seed must be an integer.*got 'abc'",
    ),
    case(
        "fit_options rounds=2.5",
        lambda tmp: _load(tmp, fit_options='{"rounds": 2.5}'),
        F,
        r"fit_options\['rounds'\] must be an integer >= 0",
    ),
    case(
        "fit_options not a dict",
        lambda tmp: _load(tmp, fit_options="[('rounds', 2)]"),
        F,
        r"fit_options must be a dict",
    ),
    case(
        "decay over the run above 1",
        lambda tmp: _load(tmp, fit_options='{"rounds": 2, "lr_decay_over_run": 2}'),
        F,
        r"fit_options\['lr_decay_over_run'\] must be a number in \(0, 1\]",
    ),
    case(
        "guide_options misspelled family",
        lambda tmp: _load(tmp, extra='guide_options = {"strucutred": {"rounds": 3}}'),
        F,
        r"unknown guide family \['strucutred'\] \(did you mean 'structured'\?\)",
    ),
    case(
        "guide_options bad value under the chosen family",
        lambda tmp: _load(
            tmp, guide="structured", extra='guide_options = {"structured": {"local_steps": 0}}'
        ),
        F,
        r"guide_options\['structured'\]: local_steps must be an integer >= 1",
    ),
    case(
        "unknown guide family chosen",
        lambda tmp: _load(tmp, guide="flow"),
        F,
        r"unknown guide family 'flow'",
    ),
    case(
        "per_client as a string",
        lambda tmp: _load(tmp, extra='per_client = "x"'),
        F,
        r"per_client must be a tuple of data keys",
    ),
    case(
        "model file without load_data",
        lambda tmp: _load(tmp, extra="load_data = None"),
        F,
        r"defines no `load_data\(\)`",
    ),
    case(
        "model file without the named model",
        lambda tmp: load_model_file(f"{_file(tmp)}:centred"),
        F,
        r"defines no 'centred'",
    ),
    # --- checkpoints
    case(
        "resume from a missing file",
        lambda tmp: _svi(**FAST).resume(tmp / "none.pt"),
        (CheckpointError, FileNotFoundError),
        r"none\.pt",
    ),
    case(
        "resume from a truncated checkpoint",
        lambda tmp: _resume_from(tmp, _truncated_checkpoint),
        CheckpointError,
        r"ckpt\.pt",
    ),
    case(
        "resume from a text file",
        lambda tmp: _resume_from(tmp, lambda p: p.write_text("not a checkpoint")),
        CheckpointError,
        r"ckpt\.pt",
    ),
    case(
        "resume from another model's checkpoint",
        lambda tmp: _resume_from(tmp, _other_models_checkpoint),
        CheckpointError,
        r"ckpt\.pt",
    ),
    # --- the command line
    case(
        "hbfl --local-steps 0",
        lambda tmp: _cli(_file(tmp), "--local-steps", 0),
        CLIError,
        r"--local-steps: .*>= 1, got 0",
    ),
    case(
        "hbfl --seed abc", lambda tmp: _cli(_file(tmp), "--seed", "abc"), CLIError, r"--seed.*'abc'"
    ),
    case(
        "hbfl --fraction 1.5",
        lambda tmp: _cli(_file(tmp), "--fraction", 1.5),
        CLIError,
        r"--fraction.*\(0, 1\], got 1.5",
    ),
    case(
        "hbfl --rounds -1",
        lambda tmp: _cli(_file(tmp), "--rounds", -1),
        CLIError,
        r"--rounds.*got -1",
    ),
    case(
        "hbfl --guide strucutred",
        lambda tmp: _cli(_file(tmp), "--guide", "strucutred"),
        CLIError,
        r"strucutred",
    ),
    case(
        "hbfl with a misspelled fit_options key",
        lambda tmp: _cli(_file(tmp, fit_options='{"rounds": 2, "sever_lr": 0.1}')),
        CLIError,
        r"hbfl: error: .*unknown fit_options \['sever_lr'\] \(did you mean 'server_lr'\?\)",
    ),
    case(
        "hbfl with negative data into a Gamma",
        lambda tmp: _cli(_file(tmp, b="[0.5, -1.5]", likelihood="dist.Gamma(2.0, theta.exp())")),
        CLIError,
        r"hbfl: error: .*client 'b', observed site 'y'.*Gamma.*index \(1,\)",
    ),
    case(
        "hbfl with a model that ignores the mask",
        lambda tmp: _cli(_unmasked_file(tmp)),
        CLIError,
        r"hbfl: error: .*poutine\.mask\(mask=data\['mask'\]\)",
    ),
    case(
        "hbfl with a missing file",
        lambda tmp: _cli(tmp / "nowhere.py"),
        CLIError,
        r"hbfl: error: model file .*nowhere\.py' not found",
    ),
]


def _unmasked_file(tmp_path):
    path = _file(tmp_path)
    path.write_text(path.read_text().replace(', poutine.mask(mask=data["mask"])', ""))
    return path


@pytest.fixture
def no_rounds(monkeypatch):
    """Fail if any round starts; afterwards, every fit built is still at round 0."""
    steps = []

    def step(self):
        steps.append(self)
        raise AssertionError("a round started before the error")

    monkeypatch.setattr(hbfl_pyro.svi.FederatedSVI, "step", step)
    _FITS.clear()
    yield
    assert steps == [], "a round ran"
    for fit in _FITS:
        assert fit.round == 0 and fit.history == []
    _FITS.clear()


@pytest.mark.parametrize("build, error, pattern", CASES)
def test_bad_input_is_refused_before_any_round(build, error, pattern, tmp_path, no_rounds):
    with pytest.raises(error) as info:
        build(tmp_path)
    message = str(info.value)
    assert re.search(pattern, message, re.S), f"{pattern!r} not in: {message}"


def test_the_table_has_every_case_of_issue_14_and_40_more():
    assert len(CASES) >= 21 + 40
    assert len({c.id for c in CASES}) == len(CASES)
