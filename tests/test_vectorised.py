"""The vectorised engine computes the per-client loop's updates.

Whenever the clients' objective is deterministic the two engines must agree to float
round-off: closed-form mode with moment-matched noise (exact expectations for the
Normal-Normal block), and gradient mode with a point-mass global factor (``AutoDelta``)
so the block is again a sum of single-coordinate quadratics. Under partial participation
the client sampling, per-client Adam state and learning-rate decay must line up too.
"""

import normal_normal
import pytest
import torch
from pyro.infer.autoguide import AutoDelta

from hbfl_pyro import FederatedSVI, StructuredLocalNormal

# Same arithmetic in a different order (batched sums, row-wise Adam): float64 round-off
# accumulated over ~100 Adam steps stays far below 1e-9.
TOL = dict(rtol=1e-9, atol=1e-10)


def _fit(engine, server, **kwargs):
    return FederatedSVI(
        normal_normal.model,
        normal_normal.load_data(num_clients=7),
        seed=3,
        server=server,
        fraction=0.5,
        local_steps=15,
        local_lr=0.1,
        local_lr_decay=0.8,
        num_particles=2,
        grad_particles=2,
        moment_matched=True,
        engine=engine,
        **kwargs,
    )


@pytest.mark.parametrize(
    "server, extra",
    [
        ("closed_form", {}),
        ("gradient", {"global_guide": AutoDelta}),
        # A structured q_i(theta_i | phi): its slopes stack along the clients axis too.
        ("gradient", {"global_guide": AutoDelta, "local_guide": StructuredLocalNormal}),
    ],
)
def test_vectorised_engine_equals_loop(server, extra):
    loop, vec = _fit("inprocess", server, **extra), _fit("vectorised", server, **extra)
    loop.run(6, progress=False)
    vec.run(6, progress=False)
    a, b = loop.state_dict(), vec.state_dict()
    assert [r["clients"] for r in loop.history] == [r["clients"] for r in vec.history]
    for name in a["clients"]:
        assert a["clients"][name]["updates"] == b["clients"][name]["updates"]
        for key, value in a["clients"][name]["guide"].items():
            torch.testing.assert_close(b["clients"][name]["guide"][key], value, **TOL)
    for key in ("family_params", "global_guide"):
        for k, value in a["server"].get(key, {}).items():
            torch.testing.assert_close(b["server"][key][k], value, **TOL)
    torch.testing.assert_close(
        torch.tensor([r["elbo"] for r in vec.history]),
        torch.tensor([r["elbo"] for r in loop.history]),
        **TOL,
    )
