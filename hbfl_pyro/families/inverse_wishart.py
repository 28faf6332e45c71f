"""The inverse-Wishart distribution, and the bijection of its support that Pyro needs.

:class:`InverseWishart` is the prior and the variational factor of the covariance in
:class:`~hbfl_pyro.NIWFull`: a :class:`~pyro.distributions.TorchDistribution` with
reparameterised draws (Bartlett), ``log_prob`` and its mean. Its support is the positive-
definite matrices with a registered bijection to ``R^{d(d+1)/2}``
(:class:`VechToPositiveDefinite`), so that autoguides and NUTS can work on it
unconstrained.

Example::

    >>> import torch
    >>> iw = InverseWishart(torch.tensor(5.0), torch.eye(2))
    >>> iw.rsample((3,)).shape, torch.allclose(iw.mean, torch.eye(2) / 2)
    (torch.Size([3, 2, 2]), True)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.util import broadcast_shape
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

__all__ = ["InverseWishart", "VechToPositiveDefinite"]

_LOG_2 = math.log(2.0)
TensorLike = float | torch.Tensor
_EMPTY = torch.Size()


# --------------------------------------------------------------------------------------
# Positive-definite support with a bijection to R^{d(d+1)/2}
# --------------------------------------------------------------------------------------


class _PositiveDefiniteBijective(constraints._PositiveDefinite):
    """``constraints.positive_definite`` plus a registered bijection.

    Pyro registers only ``transform_to`` (not ``biject_to``) for
    ``constraints.positive_definite``, because its ``LowerCholeskyTransform`` ignores the
    upper triangle and is not a bijection. NUTS and the autoguides need ``biject_to``.
    A subclass (rather than a new registration for torch's own constraint) keeps the
    change local to :class:`InverseWishart` sites.
    """


_positive_definite = _PositiveDefiniteBijective()


def _tri_size_to_dim(n: int) -> int:
    d = round((math.sqrt(8 * n + 1) - 1) / 2)
    if d * (d + 1) // 2 != n:
        raise ValueError(f"{n} is not a triangular number d(d+1)/2")
    return d


class VechToPositiveDefinite(Transform):
    r"""Bijection from ``R^{d(d+1)/2}`` to ``d x d`` positive-definite matrices.

    The vector fills the lower triangle (row-major, :func:`torch.tril_indices` order) of
    ``L``, the diagonal through ``exp``, and the result is ``L L^T``. The log-Jacobian,
    with respect to the ``d(d+1)/2`` distinct entries of the output, is
    ``d log 2 + sum_j (d - j + 1) log L_jj`` (``j = 1..d``; Muirhead, Thm 2.1.9, plus the
    ``exp`` of the diagonal).
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.positive_definite
    bijective = True

    def __eq__(self, other):
        return isinstance(other, VechToPositiveDefinite)

    def _call(self, x):
        d = _tri_size_to_dim(x.shape[-1])
        rows, cols = torch.tril_indices(d, d, device=x.device)
        on_diag = rows == cols
        # Filled by indexing rather than Tensor.tril: tril runs a parallel loop even
        # for 3x3 inputs, which is slow when the CPU is shared (NUTS calls this often).
        values = torch.where(on_diag, x.exp(), x)
        tril = x.new_zeros(x.shape[:-1] + (d, d))
        tril[..., rows, cols] = values
        return tril @ tril.mT

    def _inverse(self, y):
        d = y.shape[-1]
        rows, cols = torch.tril_indices(d, d, device=y.device)
        values = torch.linalg.cholesky(y)[..., rows, cols]
        return torch.where(rows == cols, values.log(), values)

    def log_abs_det_jacobian(self, x, y):
        d = y.shape[-1]
        rows, cols = torch.tril_indices(d, d, device=x.device)
        log_diag = x[..., rows == cols]  # log L_jj, j = 1..d
        weights = torch.arange(d + 1, 1, -1, dtype=x.dtype, device=x.device)
        return d * _LOG_2 + (log_diag * weights).sum(-1)

    def forward_shape(self, shape):
        d = _tri_size_to_dim(shape[-1])
        return torch.Size(shape[:-1]) + (d, d)

    def inverse_shape(self, shape):
        d = shape[-1]
        return torch.Size(shape[:-2]) + (d * (d + 1) // 2,)


@biject_to.register(_PositiveDefiniteBijective)
@transform_to.register(_PositiveDefiniteBijective)
def _transform_to_positive_definite(constraint):
    return VechToPositiveDefinite()


# --------------------------------------------------------------------------------------
# Inverse Wishart
# --------------------------------------------------------------------------------------


class InverseWishart(TorchDistribution):
    r"""Inverse Wishart distribution over ``d x d`` positive-definite matrices.

    .. math::

        p(X) = \frac{|\Psi|^{\nu/2}}{2^{\nu d/2}\Gamma_d(\nu/2)}
               |X|^{-(\nu+d+1)/2} \exp\left(-\tfrac12 \mathrm{tr}(\Psi X^{-1})\right),

    so that ``X^{-1} ~ Wishart(df, scale_matrix^{-1})``. For ``d = 1`` this is
    ``InverseGamma(df / 2, scale_matrix / 2)``.

    Its support is ``positive_definite`` with a registered bijection to
    ``R^{d(d+1)/2}``, so sites of this distribution work with NUTS and autoguides.

    :param df: degrees of freedom ``nu > d - 1``; shape broadcastable with the batch shape.
    :param scale_matrix: the scale ``Psi``, shape ``(..., d, d)``, positive definite.

    Example::

        >>> import torch
        >>> iw = InverseWishart(torch.tensor(5.0), torch.eye(2))
        >>> iw.sample((3,)).shape
        torch.Size([3, 2, 2])
        >>> iw.mean
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """

    arg_constraints: ClassVar[dict] = {
        "df": constraints.positive,
        "scale_matrix": constraints.positive_definite,
    }
    support = _positive_definite
    has_rsample = True

    def __init__(self, df: TensorLike, scale_matrix: torch.Tensor, validate_args=None):
        if scale_matrix.dim() < 2 or scale_matrix.shape[-1] != scale_matrix.shape[-2]:
            raise ValueError("scale_matrix must have shape (..., d, d)")
        df = torch.as_tensor(df, dtype=scale_matrix.dtype, device=scale_matrix.device)
        batch_shape = broadcast_shape(df.shape, scale_matrix.shape[:-2])
        event_shape = scale_matrix.shape[-2:]
        self.df = df.expand(batch_shape)
        self.scale_matrix = scale_matrix.expand(batch_shape + event_shape)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)
        d = event_shape[-1]
        if self._validate_args and not bool((self.df > d - 1).all()):
            raise ValueError(f"df must be greater than d - 1 = {d - 1}")
        self._scale_tril = torch.linalg.cholesky(self.scale_matrix)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(InverseWishart, _instance)
        batch_shape = torch.Size(batch_shape)
        new.df = self.df.expand(batch_shape)
        new.scale_matrix = self.scale_matrix.expand(batch_shape + self.event_shape)
        new._scale_tril = self._scale_tril.expand(batch_shape + self.event_shape)
        super(InverseWishart, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        d = self.event_shape[-1]
        denom = (self.df - d - 1)[..., None, None]
        mean = self.scale_matrix / denom
        # The mean exists only for df > d + 1.
        return torch.where(denom > 0, mean, torch.full_like(mean, float("nan")))

    def rsample(self, sample_shape=_EMPTY):
        # Bartlett decomposition: with A lower triangular, A_jj^2 ~ chi2(df - j + 1) and
        # A_jk ~ N(0, 1) below the diagonal, and Psi = R R^T, the matrix
        # W = R^{-T} A A^T R^{-1} ~ Wishart(df, Psi^{-1}); hence
        # X = W^{-1} = B^T B with B = A^{-1} R^T. Solving a triangular system instead
        # of inverting W keeps X symmetric positive definite to round-off.
        shape = self._extended_shape(sample_shape)
        d = shape[-1]
        offsets = torch.arange(d, dtype=self.df.dtype, device=self.df.device)
        dof = self.df.expand(shape[:-2]).unsqueeze(-1) - offsets
        diag = torch.distributions.Chi2(dof).rsample().sqrt()
        noise = torch.randn(shape, dtype=self.df.dtype, device=self.df.device)
        steps = torch.arange(d, device=self.df.device)
        below = steps.unsqueeze(-1) > steps  # strictly lower triangle, without tril
        a = torch.where(below, noise, torch.diag_embed(diag))
        b = torch.linalg.solve_triangular(a, self._scale_tril.mT.expand(shape), upper=False)
        x = b.mT @ b
        return 0.5 * (x + x.mT)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        d = self.event_shape[-1]
        nu = self.df
        value_tril = torch.linalg.cholesky(value)
        logdet_x = 2.0 * value_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_psi = 2.0 * self._scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        # tr(Psi X^{-1}) = ||L_X^{-1} R||_F^2 for X = L_X L_X^T, Psi = R R^T.
        shape = broadcast_shape(value_tril.shape, self._scale_tril.shape)
        m = torch.linalg.solve_triangular(
            value_tril.expand(shape), self._scale_tril.expand(shape), upper=False
        )
        trace = m.pow(2).sum((-2, -1))
        return (
            0.5 * nu * logdet_psi
            - 0.5 * nu * d * _LOG_2
            - torch.mvlgamma(0.5 * nu, d)
            - 0.5 * (nu + d + 1) * logdet_x
            - 0.5 * trace
        )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
