"""Check that each NumPyro twin (``numpyro_models.py``) and its Pyro model file define the
same joint log density on the pooled data.

For each model, a few random points are drawn in NumPyro's unconstrained space (uniform in
[-2, 2] per coordinate, as NumPyro's ``init_to_uniform`` does), mapped to the constrained
values of every latent site through ``biject_to(support)``, and the joint log density of
the pooled data is evaluated by both (eagerly, nothing is compiled):

* Pyro: ``poutine.trace(poutine.condition(model, values)).get_trace(batch).log_prob_sum()``
* NumPyro: ``numpyro.infer.util.log_density(twin, (arrays,), {}, values)``

They must agree to 1e-6 relative, with the same latent sites and shapes. ``reference.py``
runs the same check before sampling. Usage::

    pip install numpyro jax[cpu]
    PYTHONPATH=. python benchmarks/tuning_free/check_twins.py [NAME ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.distributions.transforms import biject_to  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from numpyro_models import TWINS  # noqa: E402
from pyro import poutine  # noqa: E402
from tuning_free_common import Benchmark, load_benchmark, model_names  # noqa: E402

RTOL = 1e-6


class TwinMismatch(AssertionError):
    """A NumPyro twin and its Pyro model disagree."""


def pyro_log_density(bench: Benchmark, values: Dict[str, np.ndarray]) -> float:
    conditioned = poutine.condition(
        bench.model_file.model, data={k: torch.as_tensor(np.array(v)) for k, v in values.items()}
    )
    trace = poutine.trace(conditioned).get_trace(bench.batch)
    return float(trace.log_prob_sum())


def random_point(twin, arrays, rng: np.random.Generator, radius: float = 2.0) -> dict:
    """Constrained values of every latent site of ``twin``, from unconstrained coordinates
    uniform in ``[-radius, radius]`` (drawn site by site, in model order, so a support may
    depend on earlier sites)."""
    values = {}

    def draw(msg):
        if msg["type"] != "sample" or msg.get("is_observed"):
            return None
        transform = biject_to(msg["fn"].support)
        shape = transform.inverse_shape(msg["fn"].shape())
        value = transform(jax.numpy.asarray(rng.uniform(-radius, radius, size=shape)))
        values[msg["name"]] = np.asarray(value)
        return value

    handlers.trace(handlers.substitute(twin, substitute_fn=draw)).get_trace(arrays)
    return values


def check_twin(bench: Benchmark, points: int = 5, seed: int = 0, rtol: float = RTOL) -> dict:
    """Compare the two log densities at ``points`` random points; raise on a mismatch.

    :returns: ``{"points", "max_rel_diff", "log_densities": [[pyro, numpyro], ...]}``.
    """
    twin = TWINS[bench.name]
    arrays = bench.arrays()
    pairs: List[List[float]] = []
    worst = 0.0
    for i in range(points):
        values = random_point(twin, arrays, np.random.default_rng([seed, i]))
        if set(values) != set(bench.sites):
            raise TwinMismatch(
                f"{bench.name}: latent sites differ: NumPyro {sorted(values)}, "
                f"Pyro {sorted(bench.sites)}"
            )
        for name, site in bench.sites.items():
            if values[name].shape != site.shape:
                raise TwinMismatch(
                    f"{bench.name}: site {name!r} has shape {values[name].shape} in NumPyro, "
                    f"{site.shape} in Pyro"
                )
        lp_numpyro = float(log_density(twin, (arrays,), {}, values)[0])
        lp_pyro = pyro_log_density(bench, values)
        rel = abs(lp_pyro - lp_numpyro) / max(abs(lp_pyro), 1e-300)
        worst = max(worst, rel)
        pairs.append([lp_pyro, lp_numpyro])
        if not rel <= rtol:
            raise TwinMismatch(
                f"{bench.name}: log densities differ at point {i}: Pyro {lp_pyro!r}, NumPyro "
                f"{lp_numpyro!r} (relative difference {rel:.3g} > {rtol:g})"
            )
    return {"points": points, "seed": seed, "max_rel_diff": worst, "log_densities": pairs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="models (default: all)")
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = []
    for name in args.names or model_names():
        bench = load_benchmark(name)
        try:
            result = check_twin(bench, args.points, args.seed)
        except TwinMismatch as exc:
            print(f"FAIL {exc}")
            failed.append(name)
            continue
        lps = ", ".join(f"{p:.6g}" for p, _ in result["log_densities"])
        print(
            f"ok   {name:12s} {result['points']} points, max relative difference "
            f"{result['max_rel_diff']:.2e} (log densities {lps})"
        )
    if failed:
        print(f"twin check FAILED for {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
