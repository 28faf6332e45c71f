"""Tier 1, exact identities: the federated blocks add up to the centralised ELBO.

For the same draws of ``(phi, theta_1..N)``, the server term plus every client's term
(each computed on that client's own data alone, as the federated code computes them)
must equal Pyro's single-sample ELBO of the pooled joint model and guide, and so must
their gradients with respect to every variational parameter. Everything is float64 and
deterministic, so the only difference allowed is the order of floating-point sums.
"""

import eight_schools
import normal_normal
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.func import functional_call

from hbfl_pyro import FederatedSVI
from hbfl_pyro.elbo import client_terms, server_term
from hbfl_pyro.guides import private_params
from hbfl_pyro.pooled import joint_guide_of

# Summation order differs between the pooled and the per-client computations: float64
# round-off on sums of ~10 terms of size ~100 is ~1e-13, far inside rtol=1e-6.
RTOL = 1e-6

CASES = {
    # mu and tau enter the likelihood through theta = mu + tau * theta_trans.
    "eight_schools_noncentered": (eight_schools.noncentered, eight_schools.load_data()),
    # ragged clients (3 to 30 observations), mask and a nested observation plate.
    "normal_normal": (normal_normal.model, normal_normal.load_data(num_clients=5)),
}


def _perturb(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _slice_client(trace, index, structure):
    """The part of a pooled guide trace that belongs to client ``index``."""
    sliced = Trace()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue  # the plate's own site holds the pooled subsample indices
        value = site["value"]
        if any(f.name == structure.plate for f in site["cond_indep_stack"]):
            axis = value.dim() - site["fn"].event_dim + structure.plate_dim
            value = value.narrow(axis, index, 1)
        sliced.add_node(name, **{**site, "value": value})
    return sliced


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_sum_to_pooled_elbo_and_gradients(case):
    model, data = CASES[case]
    fit = FederatedSVI(model, data, server="gradient", seed=0)
    gen = torch.Generator().manual_seed(1)
    _perturb(fit.server.global_guide, gen)
    for client in fit.clients.values():
        _perturb(client.local_guide, gen)
    joint = joint_guide_of(fit)
    clients = list(fit.clients.values())
    global_params = dict(fit.server.global_guide.named_parameters())
    local_leaves = [dict(c.local_guide.named_parameters()) for c in clients]
    pooled = fit.data.collate()

    with private_params():
        # The pooled local guide reads the clients' own parameter tensors, concatenated,
        # so both sides are functions of the same leaves.
        stacked = {k: torch.cat([leaves[k] for leaves in local_leaves]) for k in local_leaves[0]}

        def pooled_guide(batch):
            out = dict(joint.global_guide(batch))
            out.update(functional_call(joint.local, stacked, (batch,)))
            return out

        guide_trace = poutine.trace(pooled_guide).get_trace(pooled)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(pooled)
        reference = model_trace.log_prob_sum() - guide_trace.log_prob_sum()

        # Federated side: the server on its placeholder, each client on its own data only.
        replay_global = poutine.replay(fit.server.global_guide, trace=guide_trace)
        total = server_term(
            model, replay_global, fit.server.placeholder, fit.structure, num_particles=1
        )
        for i, client in enumerate(clients):
            own = _slice_client(guide_trace, i, fit.structure)
            total = (
                total
                + client_terms(
                    model,
                    poutine.replay(fit.server.global_guide, trace=own),
                    poutine.replay(client.local_guide, trace=own),
                    client._batch,
                    fit.structure,
                    num_clients=1,
                ).sum()
            )

    torch.testing.assert_close(total, reference, rtol=RTOL, atol=0.0)
    leaves = list(global_params.values()) + [p for d in local_leaves for p in d.values()]
    grad_ref = torch.autograd.grad(reference, leaves, retain_graph=True)
    grad_fed = torch.autograd.grad(total, leaves)
    for g_ref, g_fed in zip(grad_ref, grad_fed):
        torch.testing.assert_close(g_fed, g_ref, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pooled_reference_is_pyros_trace_elbo(case):
    """The reference above is exactly what Pyro's ``Trace_ELBO`` computes (same seed)."""
    model, data = CASES[case]
    fit = FederatedSVI(model, data, server="gradient", seed=0)
    joint = joint_guide_of(fit)
    pooled = fit.data.collate()
    with private_params():
        torch.manual_seed(5)
        loss = Trace_ELBO().differentiable_loss(model, joint, pooled)
        torch.manual_seed(5)
        guide_trace = poutine.trace(joint).get_trace(pooled)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(pooled)
    torch.testing.assert_close(
        -loss, model_trace.log_prob_sum() - guide_trace.log_prob_sum(), rtol=1e-12, atol=0.0
    )
