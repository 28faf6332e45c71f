"""Normal–Inverse-Wishart families: the paper's main model (method.md §4).

Three conjugate pairs ``p(phi) p(theta_i | phi)`` for a local site ``theta_i`` in ``R^d``:

- :class:`NIWFull`: ``phi = (mu, Sigma)`` with a full ``d x d`` covariance,
  ``Sigma ~ InverseWishart(nu0, Sigma0)``, ``mu | Sigma ~ N(mu0, Sigma / lambda0)``,
  ``theta_i ~ N(mu, Sigma)``.
- :class:`NIWDiag`: one Normal-Inverse-Gamma per coordinate ``k``,
  ``sigma2_k ~ InvGamma(a0, b0)``, ``mu_k | sigma2_k ~ N(mu0_k, sigma2_k / lambda0)``,
  ``theta_ik ~ N(mu_k, sigma2_k)``.
- :class:`NIWIso`: one shared variance, ``sigma2 ~ InvGamma(a0, b0)``,
  ``mu | sigma2 ~ N(mu0, sigma2 / lambda0 I)``, ``theta_i ~ N(mu, sigma2 I)``.

In each, ``q(phi)`` has the prior's form and the server block of the ELBO is maximised
exactly by the conjugate update in which the client means ``m_i`` act as observations
and the client covariances ``V_i`` are added to the scatter. The clients' prox term is
``E_{q(phi)}[log p(theta_i | phi)]``, a quadratic in ``theta_i`` with precision
``n0 V0^{-1}`` (full) or ``a / b`` (diag, iso).

Every family also offers :meth:`~NIWFull.sample_global` and :meth:`~NIWFull.sample_local`,
which issue the model's ``pyro.sample`` statements for ``p(phi)`` and ``p(theta_i | phi)``,
so that a user's model written with them agrees with the family by construction and runs
under plain Pyro (SVI, NUTS).

**Stating hyper-priors per coordinate (the high-dimension trap).** What moves clients is
the prox precision ``E_q[Sigma^{-1}]``; at the prior it is ``nu0 Sigma0^{-1}`` (full) or
``a0 / b0`` (diag, iso), per coordinate. The habit of choosing ``Sigma0`` so that the
prior *mean* of ``Sigma``, ``Sigma0 / (nu0 - d - 1)``, is ``s I`` with the smallest
allowed ``nu0 = d + 2`` gives a prox weight ``(d + 2) / s`` per coordinate, which freezes
clients when ``d`` is large; the full family cannot escape this for ``d >> N`` because a
proper inverse Wishart needs ``nu0 > d - 1``. Use :class:`NIWDiag` or :class:`NIWIso`
for neural networks, whose hyper-priors are per coordinate (diag) or per shared variance
(iso) and do not grow with ``d``.

The inverse-Wishart distribution of :class:`NIWFull` is in
:mod:`hbfl_pyro.families.inverse_wishart`. This module stays one (about 730 lines):
the three families are one conjugate model (the same update, prox term and
sampling statements, with the covariance full, diagonal or one shared variance) and
share its helpers; split, each would read the others' maths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from .base import ClosedFormFamily, Params
from .inverse_wishart import InverseWishart, VechToPositiveDefinite

__all__ = ["InverseWishart", "NIWDiag", "NIWFull", "NIWIso", "VechToPositiveDefinite"]

_LOG_2 = math.log(2.0)
_LOG_2PI = math.log(2.0 * math.pi)

TensorLike = float | torch.Tensor


def _reference(*values) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the first tensor among ``values`` (else the defaults)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.dtype, v.device
    return torch.get_default_dtype(), torch.device("cpu")


def _vector(value: TensorLike, d: int, dtype, device, name: str) -> torch.Tensor:
    """A hyper-parameter broadcast to one value per coordinate, shape ``(d,)``."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        return t.expand(d).clone()
    except RuntimeError as e:
        raise ValueError(f"{name} must be a scalar or have shape ({d},)") from e


def _scalar(value: TensorLike, dtype, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar")
    return t.reshape(())


def _diagonal(cov: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The diagonal of a client covariance given as ``(d,)`` or ``(d, d)``."""
    if cov.shape == mean.shape:
        return cov
    return cov.diagonal(dim1=-2, dim2=-1)


def _ig_expected_log_ratio(a, b, a0, b0) -> torch.Tensor:
    """``E_{IG(a, b)}[log IG(x; a0, b0) - log IG(x; a, b)]`` element-wise.

    Uses ``E[log x] = log b - digamma(a)`` and ``E[1/x] = a / b``.
    """
    e_log = b.log() - torch.digamma(a)
    e_inv = a / b
    log_p = a0 * b0.log() - torch.lgamma(a0) - (a0 + 1) * e_log - b0 * e_inv
    log_q = a * b.log() - torch.lgamma(a) - (a + 1) * e_log - a
    return log_p - log_q


def _check_sites(global_sites: Sequence[str], n: int) -> tuple[str, ...]:
    global_sites = tuple(global_sites)
    if len(global_sites) != n:
        raise ValueError(f"expected {n} global site names, got {global_sites}")
    return global_sites


def _expected_log_det_inverse_wishart(n0, v0_tril, d: int) -> torch.Tensor:
    """``E[log|Sigma|]`` for ``Sigma ~ IW(n0, V0)``, ``V0 = v0_tril v0_tril^T``."""
    logdet_v0 = 2.0 * v0_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    j = torch.arange(1, d + 1, dtype=v0_tril.dtype, device=v0_tril.device)
    return logdet_v0 - d * _LOG_2 - torch.digamma(0.5 * (n0.unsqueeze(-1) - j + 1)).sum(-1)


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------


class NIWFull(ClosedFormFamily):
    r"""Normal–Inverse-Wishart prior on the mean and full covariance of ``theta_i``.

    Model (``d`` the size of ``theta_i``)::

        Sigma          ~ InverseWishart(nu0, Sigma0)
        mu | Sigma     ~ MVN(mu0, Sigma / lambda0)
        theta_i | phi  ~ MVN(mu, Sigma)

    ``q(phi) = NIW(m0, l0, V0, n0)`` with parameters ``{"m0", "l0", "V0", "n0"}``.
    Given client means ``m_i`` and covariances ``V_i`` the exact server optimum is
    ``l0 = lambda0 + N``, ``m0 = (lambda0 mu0 + sum_i m_i) / l0``, ``n0 = nu0 + N``,
    ``V0 = Sigma0 + lambda0 mu0 mu0^T + sum_i (m_i m_i^T + V_i) - l0 m0 m0^T``.
    The clients' prox precision is ``E_q[Sigma^{-1}] = n0 V0^{-1}``.

    Hyper-priors: ``mu0`` and ``lambda0`` are per coordinate as usual; for the
    covariance, the quantity to state per coordinate is the prox precision at the prior,
    ``nu0 Sigma0^{-1}``, not the prior mean of ``Sigma`` (see the module docstring). The
    default ``Sigma0 = nu0 I`` makes it the identity. Use this family for small ``d``
    (statistical models); with ``d >> N`` the constraint ``nu0 > d - 1`` makes the prox
    weight grow like ``d / N``.

    :param int d: size of ``theta_i``.
    :param mu0: prior mean of ``mu``, scalar or shape ``(d,)``.
    :param lambda0: prior pseudo-count of ``mu`` (scalar > 0).
    :param Sigma0: inverse-Wishart scale: ``None`` (``nu0 I``), a scalar ``s`` (``s I``),
        shape ``(d,)`` (diagonal) or ``(d, d)``.
    :param nu0: inverse-Wishart degrees of freedom, ``> d - 1``; default ``d + 2``.
    :param global_sites: the model's site names for ``(mu, Sigma)``.
    :param str local_site: the model's site name for ``theta_i``.

    Example::

        >>> import torch, pyro
        >>> fam = NIWFull(2, mu0=0.0, lambda0=1.0)
        >>> s = [fam.client_summary(torch.tensor([1.0, 2.0]), torch.eye(2)) for _ in range(3)]
        >>> params = fam.server_update({k: sum(x[k] for x in s) for k in s[0]}, 3)
        >>> fam.point_values(params)["mu"]
        tensor([0.7500, 1.5000])
        >>> def model():
        ...     phi = fam.sample_global()
        ...     with pyro.plate("clients", 5):
        ...         return fam.sample_local(phi)
        >>> model().shape
        torch.Size([5, 2])
    """

    covariance = "full"

    def __init__(
        self,
        d: int,
        mu0: TensorLike = 0.0,
        lambda0: TensorLike = 1.0,
        Sigma0: TensorLike | None = None,
        nu0: TensorLike | None = None,
        global_sites: Sequence[str] = ("mu", "Sigma"),
        local_site: str = "theta",
    ):
        dtype, device = _reference(mu0, lambda0, Sigma0, nu0)
        self.d = int(d)
        self.global_sites = _check_sites(global_sites, 2)
        self.local_site = local_site
        self.mu0 = _vector(mu0, self.d, dtype, device, "mu0")
        self.lambda0 = _scalar(lambda0, dtype, device, "lambda0")
        self.nu0 = _scalar(self.d + 2.0 if nu0 is None else nu0, dtype, device, "nu0")
        if not bool(self.nu0 > self.d - 1):
            raise ValueError(f"nu0 must be greater than d - 1 = {self.d - 1}")
        eye = torch.eye(self.d, dtype=dtype, device=device)
        if Sigma0 is None:
            Sigma0 = self.nu0 * eye
        Sigma0 = torch.as_tensor(Sigma0, dtype=dtype, device=device)
        if Sigma0.dim() == 0:
            Sigma0 = Sigma0 * eye
        elif Sigma0.dim() == 1:
            Sigma0 = torch.diag_embed(Sigma0.expand(self.d))
        if Sigma0.shape != (self.d, self.d):
            raise ValueError(f"Sigma0 must be a scalar, ({self.d},) or ({self.d}, {self.d})")
        self.Sigma0 = Sigma0.clone()

    def init_params(self) -> Params:
        """The prior's own parameters as ``q(phi)``.

        :returns: ``{"m0": mu0, "l0": lambda0, "V0": Sigma0, "n0": nu0}``.
        """
        return {
            "m0": self.mu0.clone(),
            "l0": self.lambda0.clone(),
            "V0": self.Sigma0.clone(),
            "n0": self.nu0.clone(),
        }

    def client_summary(self, mean: torch.Tensor, cov: torch.Tensor) -> Params:
        """One client's contribution to the server's sums.

        :param mean: ``m_i``, shape ``(d,)``.
        :param cov: ``V_i``, shape ``(d, d)``, or ``(d,)`` for a diagonal covariance.
        :returns: ``{"sum_m": m_i, "sum_mm": m_i m_i^T + V_i, "count": 1}``.
        """
        if cov.shape == mean.shape:
            cov = torch.diag_embed(cov)
        outer = mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return {
            "sum_m": mean,
            "sum_mm": outer + cov,
            "count": mean.new_ones(mean.shape[:-1]),
        }

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        """The exact maximiser of the server block (conjugate NIW update).

        :param sums: sums over clients of :meth:`client_summary`.
        :param num_clients: the number ``N`` of clients the sums stand for.
        :returns: ``{"m0", "l0", "V0", "n0"}``.
        """
        n = torch.as_tensor(num_clients, dtype=self.mu0.dtype, device=self.mu0.device)
        l0 = self.lambda0 + n
        m0 = (self.lambda0 * self.mu0 + sums["sum_m"]) / l0
        v0 = (
            self.Sigma0
            + self.lambda0 * torch.outer(self.mu0, self.mu0)
            + sums["sum_mm"]
            - l0 * torch.outer(m0, m0)
        )
        # Symmetrise: the sums arrive with independent round-off in (j, k) and (k, j).
        v0 = 0.5 * (v0 + v0.mT)
        return {"m0": m0, "l0": l0, "V0": v0, "n0": self.nu0 + n}

    def expected_log_prior(self, theta: torch.Tensor, params: Params) -> torch.Tensor:
        r"""``E_{q(phi)}[log MVN(theta; mu, Sigma)]`` in closed form.

        Equals ``-0.5 E[log|Sigma|] - d/2 log(2 pi)
        - 0.5 [d / l0 + n0 (theta - m0)^T V0^{-1} (theta - m0)]`` with
        ``E[log|Sigma|] = log|V0| - d log 2 - sum_{j=1..d} digamma((n0 - j + 1) / 2)``.

        :param theta: shape ``(..., d)``.
        :param params: parameters of ``q(phi)``.
        :returns: shape ``(...)``.
        """
        d = self.d
        m0, l0, n0 = params["m0"], params["l0"], params["n0"]
        v0_tril = torch.linalg.cholesky(params["V0"])
        diff = (theta - m0).unsqueeze(-1)
        z = torch.linalg.solve_triangular(v0_tril.expand(diff.shape[:-1] + (d,)), diff, upper=False)
        maha = z.squeeze(-1).pow(2).sum(-1)
        e_logdet = _expected_log_det_inverse_wishart(n0, v0_tril, d)
        return -0.5 * e_logdet - 0.5 * d * _LOG_2PI - 0.5 * (d / l0 + n0 * maha)

    def neg_kl(self, params: Params) -> torch.Tensor:
        """``E_q[log p(mu, Sigma) - log q(mu, Sigma)] = -KL(q || p)`` in closed form.

        :param params: parameters of ``q(phi)``.
        :returns: a scalar tensor.
        """
        d = self.d
        m0, l0, v0, n0 = params["m0"], params["l0"], params["V0"], params["n0"]
        nu0, lambda0 = self.nu0, self.lambda0
        v0_tril = torch.linalg.cholesky(v0)
        sigma0_tril = torch.linalg.cholesky(self.Sigma0)
        e_logdet = _expected_log_det_inverse_wishart(n0, v0_tril, d)
        logdet_v0 = 2.0 * v0_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_sigma0 = 2.0 * sigma0_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        # E_q[Sigma^{-1}] = n0 V0^{-1}, so E_q tr(S Sigma^{-1}) = n0 tr(S V0^{-1}).
        trace = torch.cholesky_solve(self.Sigma0, v0_tril).diagonal(dim1=-2, dim2=-1).sum(-1)
        log_p_iw = (
            0.5 * nu0 * logdet_sigma0
            - 0.5 * nu0 * d * _LOG_2
            - torch.mvlgamma(0.5 * nu0, d)
            - 0.5 * (nu0 + d + 1) * e_logdet
            - 0.5 * n0 * trace
        )
        log_q_iw = (
            0.5 * n0 * logdet_v0
            - 0.5 * n0 * d * _LOG_2
            - torch.mvlgamma(0.5 * n0, d)
            - 0.5 * (n0 + d + 1) * e_logdet
            - 0.5 * n0 * d
        )
        # -E_{q(Sigma)} KL(N(m0, Sigma / l0) || N(mu0, Sigma / lambda0)).
        delta = (m0 - self.mu0).unsqueeze(-1)
        z = torch.linalg.solve_triangular(v0_tril, delta, upper=False).squeeze(-1)
        maha = z.pow(2).sum(-1)
        gauss = 0.5 * d * (lambda0 / l0).log() - 0.5 * lambda0 * n0 * maha
        gauss = gauss - 0.5 * d * lambda0 / l0 + 0.5 * d
        return log_p_iw - log_q_iw + gauss

    def point_values(self, params: Params) -> Params:
        """Posterior means: ``mu = m0``, ``Sigma = V0 / (n0 - d - 1)`` (``nan`` unless
        ``n0 > d + 1``).

        :returns: ``{mu_site: (d,), Sigma_site: (d, d)}``.
        """
        mu_site, sigma_site = self.global_sites
        return {
            mu_site: params["m0"],
            sigma_site: InverseWishart(params["n0"], params["V0"]).mean,
        }

    def sample_posterior(self, params: Params, num_samples: int) -> Params:
        """Draws ``Sigma ~ IW(n0, V0)``, ``mu | Sigma ~ MVN(m0, Sigma / l0)``.

        :returns: ``{mu_site: (num_samples, d), Sigma_site: (num_samples, d, d)}``.
        """
        mu_site, sigma_site = self.global_sites
        sigma = InverseWishart(params["n0"], params["V0"]).rsample((num_samples,))
        mu = dist.MultivariateNormal(params["m0"], sigma / params["l0"]).rsample()
        return {mu_site: mu, sigma_site: sigma}

    def log_posterior(self, params: Params, draws: Params) -> torch.Tensor:
        mu_site, sigma_site = self.global_sites
        sigma = draws[sigma_site]
        log_q = InverseWishart(params["n0"], params["V0"]).log_prob(sigma)
        mean = dist.MultivariateNormal(params["m0"], sigma / params["l0"])
        return log_q + mean.log_prob(draws[mu_site])

    def sample_global(self) -> dict[str, torch.Tensor]:
        """``pyro.sample`` the global sites from ``p(phi)``; call outside the clients plate.

        :returns: ``{mu_site: mu, Sigma_site: Sigma}``.
        """
        mu_site, sigma_site = self.global_sites
        sigma = pyro.sample(sigma_site, InverseWishart(self.nu0, self.Sigma0))
        mu = pyro.sample(mu_site, dist.MultivariateNormal(self.mu0, sigma / self.lambda0))
        return {mu_site: mu, sigma_site: sigma}

    def sample_local(self, phi: dict[str, torch.Tensor]) -> torch.Tensor:
        """``pyro.sample`` ``theta_i ~ MVN(mu, Sigma)`` (event dim 1); call inside the
        user's ``pyro.plate("clients", C)``.

        :param phi: the dict returned by :meth:`sample_global`.
        :returns: ``theta``, shape ``(C, d)`` inside the plate.
        """
        mu_site, sigma_site = self.global_sites
        return pyro.sample(self.local_site, dist.MultivariateNormal(phi[mu_site], phi[sigma_site]))


class NIWDiag(ClosedFormFamily):
    r"""Normal-Inverse-Gamma prior per coordinate: the diagonal NIW for large ``d``.

    Model, for each coordinate ``k = 1..d``::

        sigma2_k           ~ InverseGamma(a0_k, b0_k)
        mu_k | sigma2_k    ~ Normal(mu0_k, sigma2_k / lambda0_k)
        theta_ik | phi     ~ Normal(mu_k, sigma2_k)

    ``q(phi)`` is of the same form with parameters ``{"m0", "l0", "a", "b"}``, each of
    shape ``(d,)``. Exact server optimum: ``l0 = lambda0 + N``,
    ``m0 = (lambda0 mu0 + sum_i m_i) / l0``, ``a = a0 + N / 2``,
    ``b_k = b0_k + 0.5 [sum_i (m_ik^2 + v_ik) + lambda0_k mu0_k^2 - l0_k m0_k^2]``.
    The clients' prox precision of coordinate ``k`` is ``a_k / b_k``.

    Hyper-priors are per coordinate: ``a0_k / b0_k`` is the prox precision of coordinate
    ``k`` at the prior and does not depend on ``d``, and ``2 a0`` counts as that many
    pseudo-clients. Each hyper-parameter may be a scalar (the same for every coordinate)
    or a tensor of shape ``(d,)``.

    :param int d: size of ``theta_i``.
    :param mu0: prior mean of ``mu``.
    :param lambda0: prior pseudo-count of ``mu`` (> 0).
    :param a0: inverse-gamma shape (> 0).
    :param b0: inverse-gamma rate (> 0).
    :param global_sites: the model's site names for ``(mu, sigma2)``.
    :param str local_site: the model's site name for ``theta_i``.

    Example::

        >>> import torch, pyro
        >>> fam = NIWDiag(2, mu0=0.0, lambda0=1.0, a0=2.0, b0=2.0)
        >>> s = [fam.client_summary(torch.tensor([1.0, 2.0]), torch.full((2,), 0.01))] * 3
        >>> params = fam.server_update({k: sum(x[k] for x in s) for k in s[0]}, 3)
        >>> fam.point_values(params)["mu"]
        tensor([0.7500, 1.5000])
        >>> def model():
        ...     phi = fam.sample_global()
        ...     with pyro.plate("clients", 5):
        ...         return fam.sample_local(phi)
        >>> model().shape
        torch.Size([5, 2])
    """

    covariance = "diag"

    def __init__(
        self,
        d: int,
        mu0: TensorLike = 0.0,
        lambda0: TensorLike = 1.0,
        a0: TensorLike = 2.0,
        b0: TensorLike = 2.0,
        global_sites: Sequence[str] = ("mu", "sigma2"),
        local_site: str = "theta",
    ):
        dtype, device = _reference(mu0, lambda0, a0, b0)
        self.d = int(d)
        self.global_sites = _check_sites(global_sites, 2)
        self.local_site = local_site
        self.mu0 = _vector(mu0, self.d, dtype, device, "mu0")
        self.lambda0 = _vector(lambda0, self.d, dtype, device, "lambda0")
        self.a0 = _vector(a0, self.d, dtype, device, "a0")
        self.b0 = _vector(b0, self.d, dtype, device, "b0")

    def init_params(self) -> Params:
        """The prior's own parameters as ``q(phi)``.

        :returns: ``{"m0": mu0, "l0": lambda0, "a": a0, "b": b0}``, each ``(d,)``.
        """
        return {
            "m0": self.mu0.clone(),
            "l0": self.lambda0.clone(),
            "a": self.a0.clone(),
            "b": self.b0.clone(),
        }

    def client_summary(self, mean: torch.Tensor, cov: torch.Tensor) -> Params:
        """One client's contribution to the server's sums (only the diagonal of ``V_i``).

        :param mean: ``m_i``, shape ``(d,)``.
        :param cov: ``V_i``, shape ``(d,)`` (diagonal) or ``(d, d)``.
        :returns: ``{"sum_m": m_i, "sum_mm": m_i^2 + diag(V_i), "count": 1}``.
        """
        var = _diagonal(cov, mean)
        return {
            "sum_m": mean,
            "sum_mm": mean.pow(2) + var,
            "count": mean.new_ones(mean.shape[:-1]),
        }

    def weighted_summary_sums(
        self, weights: torch.Tensor, means: torch.Tensor, var: torch.Tensor
    ) -> Params:
        """:meth:`client_summary` summed with ``weights`` over the rows of ``means``:
        ``sum_m = w @ m``, ``sum_mm = w @ m^2 + w @ v`` (one squared temporary, no
        per-client dicts)."""
        var = var.expand(means.shape[-1]) if var.dim() < 2 else var
        spread = torch.tensordot(weights, var, dims=1) if var.dim() == 2 else weights.sum() * var
        return {
            "sum_m": torch.tensordot(weights, means, dims=1),
            "sum_mm": torch.tensordot(weights, means.pow(2), dims=1) + spread,
            "count": weights.sum(),
        }

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        """The exact maximiser of the server block (conjugate update per coordinate).

        :param sums: sums over clients of :meth:`client_summary`.
        :param num_clients: the number ``N`` of clients the sums stand for.
        :returns: ``{"m0", "l0", "a", "b"}``, each ``(d,)``.
        """
        n = torch.as_tensor(num_clients, dtype=self.mu0.dtype, device=self.mu0.device)
        l0 = self.lambda0 + n
        m0 = (self.lambda0 * self.mu0 + sums["sum_m"]) / l0
        bracket = sums["sum_mm"] + self.lambda0 * self.mu0.pow(2) - l0 * m0.pow(2)
        # In exact arithmetic the bracket is a (weighted) scatter plus sum_i v_ik >= 0;
        # the clamp only stops cancellation round-off from making b fall below b0.
        b = self.b0 + 0.5 * bracket.clamp(min=0.0)
        return {"m0": m0, "l0": l0, "a": self.a0 + 0.5 * n, "b": b}

    def expected_log_prior(self, theta: torch.Tensor, params: Params) -> torch.Tensor:
        """``E_{q(phi)}[sum_k log N(theta_k; mu_k, sigma2_k)]`` in closed form.

        Per coordinate: ``-0.5 (log b - digamma(a)) - 0.5 log(2 pi)
        - 0.5 [1 / l0 + (a / b) (theta - m0)^2]``.

        :param theta: shape ``(..., d)``.
        :returns: shape ``(...)``.
        """
        m0, l0, a, b = params["m0"], params["l0"], params["a"], params["b"]
        e_log_var = b.log() - torch.digamma(a)
        per_coord = -0.5 * (e_log_var + _LOG_2PI + 1.0 / l0 + (a / b) * (theta - m0).pow(2))
        return per_coord.sum(-1)

    def neg_kl(self, params: Params) -> torch.Tensor:
        """``E_q[log p(phi) - log q(phi)] = -KL(q || p)``, summed over coordinates.

        :returns: a scalar tensor.
        """
        m0, l0, a, b = params["m0"], params["l0"], params["a"], params["b"]
        lambda0 = self.lambda0
        ig = _ig_expected_log_ratio(a, b, self.a0, self.b0)
        delta2 = (m0 - self.mu0).pow(2)
        gauss = 0.5 * (lambda0 / l0).log() - 0.5 * lambda0 * (a / b) * delta2
        gauss = gauss - 0.5 * lambda0 / l0 + 0.5
        return (ig + gauss).sum(-1)

    def point_values(self, params: Params) -> Params:
        """Posterior means: ``mu = m0``, ``sigma2 = b / (a - 1)`` (``nan`` unless ``a > 1``).

        :returns: ``{mu_site: (d,), sigma2_site: (d,)}``.
        """
        mu_site, var_site = self.global_sites
        a, b = params["a"], params["b"]
        var = torch.where(a > 1, b / (a - 1), torch.full_like(b, float("nan")))
        return {mu_site: params["m0"], var_site: var}

    def sample_posterior(self, params: Params, num_samples: int) -> Params:
        """Draws ``sigma2_k ~ IG(a, b_k)``, ``mu_k | sigma2_k ~ N(m0_k, sigma2_k / l0_k)``.

        :returns: ``{mu_site: (num_samples, d), sigma2_site: (num_samples, d)}``.
        """
        mu_site, var_site = self.global_sites
        var = dist.InverseGamma(params["a"], params["b"]).rsample((num_samples,))
        mu = dist.Normal(params["m0"], (var / params["l0"]).sqrt()).rsample()
        return {mu_site: mu, var_site: var}

    def log_posterior(self, params: Params, draws: Params) -> torch.Tensor:
        mu_site, var_site = self.global_sites
        var = draws[var_site]
        log_q = dist.InverseGamma(params["a"], params["b"]).log_prob(var).sum(-1)
        mean = dist.Normal(params["m0"], (var / params["l0"]).sqrt())
        return log_q + mean.log_prob(draws[mu_site]).sum(-1)

    def sample_global(self) -> dict[str, torch.Tensor]:
        """``pyro.sample`` the global sites from ``p(phi)``; call outside the clients plate.

        :returns: ``{mu_site: (d,), sigma2_site: (d,)}``.
        """
        mu_site, var_site = self.global_sites
        var = pyro.sample(var_site, dist.InverseGamma(self.a0, self.b0).to_event(1))
        scale = (var / self.lambda0).sqrt()
        mu = pyro.sample(mu_site, dist.Normal(self.mu0, scale).to_event(1))
        return {mu_site: mu, var_site: var}

    def sample_local(self, phi: dict[str, torch.Tensor]) -> torch.Tensor:
        """``pyro.sample`` ``theta_i ~ N(mu, diag(sigma2))`` with ``.to_event(1)``; call
        inside the user's ``pyro.plate("clients", C)``.

        :param phi: the dict returned by :meth:`sample_global`.
        :returns: ``theta``, shape ``(C, d)`` inside the plate.
        """
        mu_site, var_site = self.global_sites
        fn = dist.Normal(phi[mu_site], phi[var_site].sqrt()).to_event(1)
        return pyro.sample(self.local_site, fn)


class NIWIso(ClosedFormFamily):
    r"""Isotropic Normal-Inverse-Gamma prior: one variance shared by all coordinates.

    Model::

        sigma2           ~ InverseGamma(a0, b0)
        mu | sigma2      ~ Normal(mu0, sigma2 / lambda0 I)
        theta_i | phi    ~ Normal(mu, sigma2 I)

    ``q(phi)`` is of the same form with parameters ``{"m0": (d,), "l0", "a", "b"}``
    (the last three scalars). Exact server optimum: ``l0 = lambda0 + N``,
    ``m0 = (lambda0 mu0 + sum_i m_i) / l0``, ``a = a0 + N d / 2``,
    ``b = b0 + 0.5 [sum_i (||m_i||^2 + tr V_i) + lambda0 ||mu0||^2 - l0 ||m0||^2]``.
    The clients' prox precision ``a / b`` is FedProx's ``mu``, tuned automatically.

    Hyper-priors: ``a0 / b0`` is the prox precision per coordinate at the prior and does
    not depend on ``d``; the data add ``N d / 2`` to ``a``, so for the hyper-prior to weigh
    as much as ``k`` pseudo-clients use ``a0 = k d / 2`` and ``b0 = a0 s`` (prox
    precision ``1 / s``).

    :param int d: size of ``theta_i``.
    :param mu0: prior mean of ``mu``, scalar or shape ``(d,)``.
    :param lambda0: prior pseudo-count of ``mu`` (scalar > 0).
    :param a0: inverse-gamma shape (scalar > 0).
    :param b0: inverse-gamma rate (scalar > 0).
    :param global_sites: the model's site names for ``(mu, sigma2)``.
    :param str local_site: the model's site name for ``theta_i``.

    Example::

        >>> import torch, pyro
        >>> fam = NIWIso(2, mu0=0.0, lambda0=1.0, a0=2.0, b0=2.0)
        >>> s = [fam.client_summary(torch.tensor([1.0, 2.0]), torch.full((2,), 0.01))] * 3
        >>> params = fam.server_update({k: sum(x[k] for x in s) for k in s[0]}, 3)
        >>> fam.point_values(params)["mu"]
        tensor([0.7500, 1.5000])
        >>> def model():
        ...     phi = fam.sample_global()
        ...     with pyro.plate("clients", 5):
        ...         return fam.sample_local(phi)
        >>> model().shape
        torch.Size([5, 2])
    """

    covariance = "diag"

    def __init__(
        self,
        d: int,
        mu0: TensorLike = 0.0,
        lambda0: TensorLike = 1.0,
        a0: TensorLike = 2.0,
        b0: TensorLike = 2.0,
        global_sites: Sequence[str] = ("mu", "sigma2"),
        local_site: str = "theta",
    ):
        dtype, device = _reference(mu0, lambda0, a0, b0)
        self.d = int(d)
        self.global_sites = _check_sites(global_sites, 2)
        self.local_site = local_site
        self.mu0 = _vector(mu0, self.d, dtype, device, "mu0")
        self.lambda0 = _scalar(lambda0, dtype, device, "lambda0")
        self.a0 = _scalar(a0, dtype, device, "a0")
        self.b0 = _scalar(b0, dtype, device, "b0")

    def init_params(self) -> Params:
        """The prior's own parameters as ``q(phi)``.

        :returns: ``{"m0": mu0, "l0": lambda0, "a": a0, "b": b0}``.
        """
        return {
            "m0": self.mu0.clone(),
            "l0": self.lambda0.clone(),
            "a": self.a0.clone(),
            "b": self.b0.clone(),
        }

    def client_summary(self, mean: torch.Tensor, cov: torch.Tensor) -> Params:
        """One client's contribution to the server's sums (only ``tr V_i``).

        :param mean: ``m_i``, shape ``(d,)``.
        :param cov: ``V_i``, shape ``(d,)`` (diagonal) or ``(d, d)``.
        :returns: ``{"sum_m": m_i, "sum_mm": ||m_i||^2 + tr V_i, "count": 1}``.
        """
        var = _diagonal(cov, mean)
        return {
            "sum_m": mean,
            "sum_mm": (mean.pow(2) + var).sum(-1),
            "count": mean.new_ones(mean.shape[:-1]),
        }

    def weighted_summary_sums(
        self, weights: torch.Tensor, means: torch.Tensor, var: torch.Tensor
    ) -> Params:
        """:meth:`client_summary` summed with ``weights`` over the rows of ``means``:
        ``sum_m = w @ m``, ``sum_mm = w @ (||m_i||^2 + tr V_i)`` from one norm per row."""
        d = means.shape[-1]
        trace = var.sum(-1) if var.dim() == 2 else var.expand(d).sum()
        sq = torch.linalg.vector_norm(means, dim=-1).pow(2)
        return {
            "sum_m": torch.tensordot(weights, means, dims=1),
            "sum_mm": torch.tensordot(weights, sq + trace, dims=1),
            "count": weights.sum(),
        }

    def server_update(self, sums: Params, num_clients: float | torch.Tensor) -> Params:
        """The exact maximiser of the server block (conjugate update).

        :param sums: sums over clients of :meth:`client_summary`.
        :param num_clients: the number ``N`` of clients the sums stand for.
        :returns: ``{"m0": (d,), "l0", "a", "b"}``.
        """
        n = torch.as_tensor(num_clients, dtype=self.mu0.dtype, device=self.mu0.device)
        l0 = self.lambda0 + n
        m0 = (self.lambda0 * self.mu0 + sums["sum_m"]) / l0
        bracket = sums["sum_mm"] + self.lambda0 * self.mu0.pow(2).sum() - l0 * m0.pow(2).sum(-1)
        # Non-negative in exact arithmetic; the clamp only guards against round-off.
        b = self.b0 + 0.5 * bracket.clamp(min=0.0)
        return {"m0": m0, "l0": l0, "a": self.a0 + 0.5 * self.d * n, "b": b}

    def expected_log_prior(self, theta: torch.Tensor, params: Params) -> torch.Tensor:
        """``E_{q(phi)}[log N(theta; mu, sigma2 I)]`` in closed form:
        ``-d/2 (log b - digamma(a)) - d/2 log(2 pi) - 0.5 [d / l0 + (a / b) ||theta - m0||^2]``.

        :param theta: shape ``(..., d)``.
        :returns: shape ``(...)``.
        """
        d = self.d
        m0, l0, a, b = params["m0"], params["l0"], params["a"], params["b"]
        e_log_var = b.log() - torch.digamma(a)
        sq = (theta - m0).pow(2).sum(-1)
        return -0.5 * d * (e_log_var + _LOG_2PI) - 0.5 * (d / l0 + (a / b) * sq)

    def neg_kl(self, params: Params) -> torch.Tensor:
        """``E_q[log p(phi) - log q(phi)] = -KL(q || p)`` in closed form.

        :returns: a scalar tensor.
        """
        d = self.d
        m0, l0, a, b = params["m0"], params["l0"], params["a"], params["b"]
        lambda0 = self.lambda0
        ig = _ig_expected_log_ratio(a, b, self.a0, self.b0)
        delta2 = (m0 - self.mu0).pow(2).sum(-1)
        gauss = 0.5 * d * (lambda0 / l0).log() - 0.5 * lambda0 * (a / b) * delta2
        gauss = gauss - 0.5 * d * lambda0 / l0 + 0.5 * d
        return ig + gauss

    def point_values(self, params: Params) -> Params:
        """Posterior means: ``mu = m0``, ``sigma2 = b / (a - 1)`` (``nan`` unless ``a > 1``).

        :returns: ``{mu_site: (d,), sigma2_site: ()}``.
        """
        mu_site, var_site = self.global_sites
        a, b = params["a"], params["b"]
        var = torch.where(a > 1, b / (a - 1), torch.full_like(b, float("nan")))
        return {mu_site: params["m0"], var_site: var}

    def sample_posterior(self, params: Params, num_samples: int) -> Params:
        """Draws ``sigma2 ~ IG(a, b)``, ``mu | sigma2 ~ N(m0, sigma2 / l0 I)``.

        :returns: ``{mu_site: (num_samples, d), sigma2_site: (num_samples,)}``.
        """
        mu_site, var_site = self.global_sites
        var = dist.InverseGamma(params["a"], params["b"]).rsample((num_samples,))
        scale = (var / params["l0"]).sqrt().unsqueeze(-1)
        mu = dist.Normal(params["m0"], scale).rsample()
        return {mu_site: mu, var_site: var}

    def log_posterior(self, params: Params, draws: Params) -> torch.Tensor:
        mu_site, var_site = self.global_sites
        var = draws[var_site]
        log_q = dist.InverseGamma(params["a"], params["b"]).log_prob(var)
        scale = (var / params["l0"]).sqrt().unsqueeze(-1)
        return log_q + dist.Normal(params["m0"], scale).log_prob(draws[mu_site]).sum(-1)

    def sample_global(self) -> dict[str, torch.Tensor]:
        """``pyro.sample`` the global sites from ``p(phi)``; call outside the clients plate.

        :returns: ``{mu_site: (d,), sigma2_site: ()}``.
        """
        mu_site, var_site = self.global_sites
        var = pyro.sample(var_site, dist.InverseGamma(self.a0, self.b0))
        # unsqueeze: sigma2 may carry batch dims (vectorised particles) left of the d axis.
        scale = (var / self.lambda0).sqrt().unsqueeze(-1)
        mu = pyro.sample(mu_site, dist.Normal(self.mu0, scale).to_event(1))
        return {mu_site: mu, var_site: var}

    def sample_local(self, phi: dict[str, torch.Tensor]) -> torch.Tensor:
        """``pyro.sample`` ``theta_i ~ N(mu, sigma2 I)`` with ``.to_event(1)``; call inside
        the user's ``pyro.plate("clients", C)``.

        :param phi: the dict returned by :meth:`sample_global`.
        :returns: ``theta``, shape ``(C, d)`` inside the plate.
        """
        mu_site, var_site = self.global_sites
        scale = phi[var_site].sqrt().unsqueeze(-1)
        return pyro.sample(self.local_site, dist.Normal(phi[mu_site], scale).to_event(1))
