"""The vectorised engine computes the per-client loop's updates.

Whenever the clients' objective is deterministic the two engines must agree to float
round-off: closed-form mode with moment-matched noise (exact expectations for the
Normal-Normal block), and gradient mode with a point-mass global factor (``AutoDelta``)
so the block is again a sum of single-coordinate quadratics. Under partial participation
the client sampling, per-client Adam state and learning-rate decay must line up too.
"""

import item_response
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
    _assert_fits_equal(loop, vec)


def test_vectorised_engine_equals_loop_with_plated_globals():
    """Global sites with a plate of their own (the 2PL model's item parameters) take the
    per-client-copies path for the replies; with point-mass global *and* local factors the
    objective is deterministic, so the engines must agree to round-off."""

    def fit(engine):
        return FederatedSVI(
            item_response.model,
            item_response.load_data(num_students=9),
            per_client=item_response.per_client,
            global_guide=AutoDelta,
            local_guide=AutoDelta,
            seed=5,
            fraction=0.6,
            local_steps=7,
            local_lr=0.1,
            local_lr_decay=0.9,
            engine=engine,
        )

    loop, vec = fit("inprocess"), fit("vectorised")
    loop.run(4, progress=False)
    vec.run(4, progress=False)
    _assert_fits_equal(loop, vec)


def test_vectorised_checkpoint_resume_is_exact(tmp_path):
    """The vectorised engine keeps the clients' state where the loop keeps it (their guides
    and torch Adam states), so checkpoint/resume continues a vectorised run bit for bit."""
    whole = _fit("vectorised", "gradient", global_guide=AutoDelta)
    whole.run(4, progress=False)
    first = _fit("vectorised", "gradient", global_guide=AutoDelta)
    first.run(2, progress=False)
    first.checkpoint(tmp_path / "state.pt")
    resumed = _fit("vectorised", "gradient", global_guide=AutoDelta)
    resumed.resume(tmp_path / "state.pt")
    resumed.run(2, progress=False)
    a, b = whole.state_dict(), resumed.state_dict()
    for name in a["clients"]:
        for part in ("guide", "optim"):
            _assert_tensors(a["clients"][name][part], b["clients"][name][part], torch.equal)
    _assert_tensors(a["server"]["global_guide"], b["server"]["global_guide"], torch.equal)


def _assert_tensors(a, b, check):
    """Walk nested dicts/lists; tensors must satisfy ``check``, other leaves be equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape
        assert check(a, b)
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str)
        for key in a:
            _assert_tensors(a[key], b[key], check)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tensors(x, y, check)
    else:
        assert a == b


def _close(a, b):
    torch.testing.assert_close(b.to(a.dtype), a, **TOL)
    return True


def _assert_fits_equal(loop, vec):
    a, b = loop.state_dict(), vec.state_dict()
    assert [r["clients"] for r in loop.history] == [r["clients"] for r in vec.history]
    for name in a["clients"]:
        assert a["clients"][name]["updates"] == b["clients"][name]["updates"]
        # Local factors and the clients' Adam states (step counts and moments), in the
        # format the loop leaves: checkpoints of either engine look the same.
        _assert_tensors(a["clients"][name]["guide"], b["clients"][name]["guide"], _close)
        _assert_tensors(a["clients"][name]["optim"], b["clients"][name]["optim"], _close)
    for key in ("family_params", "global_guide"):
        for k, value in a["server"].get(key, {}).items():
            torch.testing.assert_close(b["server"][key][k], value, **TOL)
    torch.testing.assert_close(
        torch.tensor([r["elbo"] for r in vec.history]),
        torch.tensor([r["elbo"] for r in loop.history]),
        **TOL,
    )


def test_a_custom_local_guide_module_is_refused_up_front():
    """The vectorised engine rebuilds the round's guide from the template's class: a
    hand-written PyroModule guide is refused when the fit is built, naming the way out."""
    import eight_schools
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroParam

    class LocalNormal(PyroModule):  # one client's q_i(theta_trans): run on its own data
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(1))
            self.scale = PyroParam(torch.ones(1), constraint=dist.constraints.positive)

        def forward(self, data):
            with pyro.plate("clients", data["y"].shape[0], dim=-1):
                pyro.sample("theta_trans", dist.Normal(self.loc, self.scale))

    # The same guide is accepted by the in-process engine.
    FederatedSVI(eight_schools.noncentered, eight_schools.load_data(), local_guide=LocalNormal())
    with pytest.raises(NotImplementedError, match="use engine='inprocess'"):
        FederatedSVI(
            eight_schools.noncentered,
            eight_schools.load_data(),
            local_guide=LocalNormal(),
            engine="vectorised",
        )
