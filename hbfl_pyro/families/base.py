"""The interface every closed-form server family implements.

A closed-form family describes a conjugate pair ``p(phi) p(theta_i | phi)`` together with
the variational factor ``q(phi)`` the server owns. The server never runs gradient steps
on ``q(phi)``: it solves its block of the ELBO exactly from *sums over clients* of small
per-client summaries of ``q_i(theta_i)`` (method.md §3-4), which is what makes secure
aggregation possible.

Clients use :meth:`ClosedFormFamily.expected_log_prior` in place of the model's
``log p(theta_i | phi)``: it is the expectation ``E_{q(phi)}[log p(theta_i | phi)]`` in
closed form (Rao-Blackwellised), so no Monte Carlo noise from ``phi`` enters a client.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

Params = Dict[str, torch.Tensor]


class ClosedFormFamily:
    """Base class of conjugate server families.

    Subclasses set :attr:`global_sites` (the model's sample sites that make up ``phi``)
    and :attr:`local_site` (the model's per-client site ``theta_i``), and implement the
    methods below. All tensors are in the local site's *flattened event* layout:
    ``theta`` has shape ``(..., d)``.
    """

    global_sites: Tuple[str, ...] = ()
    local_site: str = ""
    #: ``"diag"`` when the family needs only the diagonal of ``Cov_q_i[theta_i]``,
    #: ``"full"`` when it needs the whole matrix.
    covariance: str = "diag"

    def init_params(self) -> Params:
        """Parameters of ``q(phi)`` before any client has replied (the prior)."""
        raise NotImplementedError

    def client_summary(self, mean: torch.Tensor, cov: torch.Tensor) -> Params:
        """One client's contribution to the server's sums.

        :param mean: ``E_{q_i}[theta_i]``, shape ``(d,)``.
        :param cov: ``Cov_{q_i}[theta_i]``: shape ``(d,)`` (diagonal) or ``(d, d)``.
        :returns: a dict of tensors; the server adds these up over clients.
        """
        raise NotImplementedError

    def weighted_summary_sums(
        self, weights: torch.Tensor, means: torch.Tensor, var: torch.Tensor
    ) -> Params:
        """``sum_i weights_i * client_summary(means_i, var_i)`` for many clients at once.

        What a server computes from the replies of one round (or a simulation from its
        stacked clients); families with cheap sums override it to skip the per-client
        ``(C, d)`` temporaries.

        :param weights: ``(C,)``, each client's multiplicity.
        :param means: ``(C, d)``.
        :param var: diagonal covariances, broadcastable to ``(C, d)`` (e.g. a scalar).
        """
        rows = self.client_summary(means, var.expand_as(means))
        return {k: torch.tensordot(weights, v, dims=1) for k, v in rows.items()}

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        """The exact maximiser of the server block given the summed client summaries.

        :param sums: the element-wise sum of :meth:`client_summary` over clients (already
            rescaled by ``N / |S|`` under partial participation when the server does so).
        :param num_clients: the number ``N`` of clients the sums stand for (a float or a
            0-d tensor).
        """
        raise NotImplementedError

    def expected_log_prior(self, theta: torch.Tensor, params: Params) -> torch.Tensor:
        """``E_{q(phi)}[log p(theta | phi)]`` for ``theta`` of shape ``(..., d)``.

        :returns: a tensor of shape ``(...)``.
        """
        raise NotImplementedError

    def neg_kl(self, params: Params) -> torch.Tensor:
        """``E_{q(phi)}[log p(phi) - log q(phi)]``, the server's own term of the ELBO."""
        raise NotImplementedError

    def point_values(self, params: Params) -> Params:
        """A value for each global site (the posterior mean), used where a value of ``phi``
        is needed to run the model but does not enter the objective."""
        raise NotImplementedError

    def sample_posterior(self, params: Params, num_samples: int) -> Params:
        """Draws of every global site from ``q(phi)``: ``{site: (num_samples, *site_shape)}``."""
        raise NotImplementedError

    def log_posterior(self, params: Params, draws: Params) -> torch.Tensor:
        """``log q(phi)`` at draws shaped as :meth:`sample_posterior` returns them: shape
        ``(num_samples,)``, a density over the global sites' own values (the measure the
        model's prior uses), so that ``log p(phi) - log q(phi)`` is an importance weight."""
        raise NotImplementedError
