"""Client-level differential privacy: clipping, Gaussian noise on the server's sums, accounting.

**Unit of privacy.** One client's whole message (all of its data): two federations are
neighbours when one client's message is replaced by nothing (the zero vector; "zero-out"
adjacency, equivalent to add/remove of one client when the roster of participants is
public, as it is to any server that receives the replies). Replacing one client's data by
other data doubles the sensitivity: that guarantee is the one reported here with the noise
multiplier halved.

**Mechanism.** Each participating client clips its message vector (every data-dependent
tensor of its reply, flattened and concatenated) to L2 norm ``clip`` *on the client*
(:meth:`DPConfig.clip_message`) and sends no ELBO value. The server's
:class:`~hbfl_pyro.servers.dp.DifferentialPrivacy` wrapper clips every reply again
(a no-op for an honest client; it bounds the sensitivity whatever a transport or a faulty
client did), sums the round's pool and adds ``N(0, (z * clip)^2 I)`` once to the sum
(:meth:`DPConfig.noisy_sum`), from a generator of its own seeded afresh from the operating
system's entropy at every release (:meth:`DPConfig.noise_seed`): noise derived from the run's
seed could be regenerated, and subtracted, by anyone who knows the seed, which ``hbfl fit``
prints and every checkpoint stores. ``reproducible_noise=True`` derives it from
``(seed, round)`` instead, for tests and benchmarks only: it voids the guarantee.
Everything the server does afterwards (scaling by ``N/|S|``, projection onto valid
statistics, the closed-form or Adam update, the next round's broadcast, the final
``q(phi)``) is post-processing of the noisy sums and keeps the guarantee.

**Threat model.** Central DP with a trusted server (or a trusted aggregator): the server
sees the clipped, un-noised replies; what it releases (``q(phi)`` each round, the history,
the final posterior of the global sites) is differentially private. Distributed noise
(each client adding a share of the variance) protects against the server only together
with secure aggregation; :mod:`hbfl_pyro.flower.secagg` is not combined with DP yet, so it
is not offered. A client's own ``q_i`` never leaves it and is not covered (it is that
client's own output). Nor are the server's checkpoints: with ``participation="stale"``
they hold the clients' clipped, un-noised replies, and must be kept like the data.

**Closed-form families.** The public key ``"count"`` (the constant 1 of every client) is
neither clipped nor noised. Noisy ``sum_m`` / ``sum_mm`` of the NIW families may be
moments no set of clients could have produced, which can make the conjugate update's scale
matrix indefinite; :func:`project_moments` projects ``sum_mm`` to the nearest (Frobenius)
value with ``sum_mm - sum_m sum_m^T / n`` positive semi-definite, which makes the update's
scatter term PSD, so ``V0 >= Sigma0`` (and ``b >= b0``) exactly as without noise. The
Normal-Normal family's scale does not depend on the sums, so it needs no projection.

**Accounting.** A round that releases a noisy sum is a Gaussian mechanism with L2
sensitivity ``clip`` and noise ``z * clip``: ``1/z``-GDP (Dong, Roth & Su 2022). ``T``
adaptive rounds compose exactly to ``sqrt(T)/z``-GDP, whose ``(epsilon, delta)`` curve is the
analytic Gaussian mechanism's (Balle & Wang 2018): the default accountant ``"gdp"`` is
exact. ``"zcdp"`` gives the looser ``rho = T / (2 z^2)``,
``epsilon = rho + 2 sqrt(rho log(1/delta))`` (Bun & Steinke 2016). Both count every round
that released a sum, sampled or not, and claim no amplification by client subsampling:
with stale participation an unsampled client's latest reply is in every round's sum
anyway, and without it the bound is conservative.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch

from .options import DP_CONFIG
from .options import check as check_options
from .seeding import derive_seed

#: Summary keys that are the same constant for every client (carry no data): not privatised.
PUBLIC_KEYS = ("count",)
ACCOUNTANTS = ("gdp", "zcdp")


# ---------------------------------------------------------------------- accounting
def _delta_of_epsilon(eps: float, mu: float) -> float:
    """``delta(eps)`` of ``mu``-GDP: ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
    from scipy.special import log_ndtr  # scipy comes with arviz; log space avoids 0 * inf

    log_a = float(log_ndtr(-eps / mu + mu / 2))
    log_b = float(log_ndtr(-eps / mu - mu / 2))
    return math.exp(log_a) * -math.expm1(min(0.0, eps + log_b - log_a))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ``epsilon`` of ``mu``-GDP at ``delta`` (exact; analytic Gaussian mechanism).

    :param mu: the GDP parameter (sensitivity / noise standard deviation, composed as the
        root sum of squares over rounds).
    :param delta: in (0, 1).
    :returns: ``epsilon >= 0`` (``inf`` for ``mu = inf``).

    Example::

        >>> round(gdp_epsilon(1.0, 1e-5), 4)  # one round at z = 1
        4.3772
    """
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if _delta_of_epsilon(0.0, mu) <= delta:
        return 0.0
    from scipy.optimize import brentq

    hi = 1.0
    while _delta_of_epsilon(hi, mu) > delta:
        hi *= 2.0
    return float(brentq(lambda e: _delta_of_epsilon(e, mu) - delta, 0.0, hi, xtol=1e-12))


def zcdp_epsilon(rho: float, delta: float) -> float:
    """``epsilon = rho + 2 sqrt(rho log(1/delta))``: the (epsilon, delta) bound of ``rho``-zCDP.

    Example::

        >>> round(zcdp_epsilon(0.5, 1e-5), 4)  # one round at z = 1: rho = 1 / (2 z^2)
        5.2985
    """
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def epsilon(noise_multiplier: float, rounds: int, delta: float, accountant: str = "gdp") -> float:
    """``epsilon`` after ``rounds`` Gaussian releases of noise multiplier ``z`` at ``delta``.

    :param noise_multiplier: ``z``: noise standard deviation over the clipping norm.
    :param rounds: rounds that released a noisy sum (``T``).
    :param delta: target ``delta`` in (0, 1).
    :param accountant: ``"gdp"`` (exact, ``mu = sqrt(T)/z``) or ``"zcdp"``
        (``rho = T/(2 z^2)``, looser).

    Example::

        >>> epsilon(1.0, 1, 1e-5) < epsilon(1.0, 1, 1e-5, "zcdp")
        True
    """
    _check_accountant(accountant)
    if not (isinstance(rounds, int) and rounds >= 0):
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    if accountant == "gdp":
        return gdp_epsilon(math.sqrt(rounds) / noise_multiplier, delta)
    return zcdp_epsilon(rounds / (2.0 * noise_multiplier**2), delta)


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, accountant: str = "gdp"
) -> float:
    """The smallest noise multiplier ``z`` giving ``epsilon <= target_epsilon`` after ``rounds``.

    Example::

        >>> z = noise_multiplier_for(4.3772, 1e-5, 1)
        >>> round(z, 3)
        1.0
    """
    from scipy.optimize import brentq

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    lo, hi = 1e-3, 1.0
    while epsilon(hi, rounds, delta, accountant) > target_epsilon:
        hi *= 2.0
    while epsilon(lo, rounds, delta, accountant) < target_epsilon:
        lo /= 2.0
    f = lambda z: epsilon(z, rounds, delta, accountant) - target_epsilon  # noqa: E731
    z = float(brentq(f, lo, hi, xtol=1e-12, rtol=1e-12))
    # Round up to the side where the budget holds (brentq may land a hair below).
    while epsilon(z, rounds, delta, accountant) > target_epsilon:
        z *= 1 + 1e-12
    return z


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


# ---------------------------------------------------------------------- clipping and noise
def message_norm(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a message's data-dependent tensors, flattened together.

    Example::

        >>> float(message_norm({"a": torch.tensor([3.0]), "b": torch.tensor(4.0),
        ...                     "count": torch.tensor(1.0)}))
        5.0
    """
    parts = [t.reshape(-1) for k, t in sorted(tensors.items()) if k not in PUBLIC_KEYS]
    return torch.linalg.vector_norm(torch.cat(parts)) if parts else torch.zeros(())


def _symmetric_keys(sums: Dict[str, torch.Tensor]) -> bool:
    m, mm = sums.get("sum_m"), sums.get("sum_mm")
    return m is not None and mm is not None and mm.shape == m.shape + m.shape[-1:]


def project_moments(sums: Dict[str, torch.Tensor], n: int) -> Dict[str, torch.Tensor]:
    """Project noisy NIW sums onto moments ``n`` clients could have sent.

    ``sum_mm - sum_m sum_m^T / n`` is PSD for any clients (Cauchy-Schwarz, and each
    ``V_i >= 0``); this clamps its negative eigenvalues (full), coordinates (diagonal) or
    value (isotropic) to zero, the Frobenius-nearest feasible ``sum_mm``. Sums without
    ``sum_m``/``sum_mm`` (Normal-Normal, gradients) are returned unchanged. It reads only
    the noisy sums, so it is post-processing and keeps the guarantee.

    :param sums: noisy sums over ``n`` clients (before any ``N/|S|`` scaling).
    :param n: the number of clients summed.

    Example::

        >>> out = project_moments({"sum_m": torch.tensor([2.0]), "sum_mm": torch.tensor([1.0])}, 2)
        >>> out["sum_mm"]  # raised to sum_m^2 / n = 2
        tensor([2.])
    """
    if "sum_m" not in sums or "sum_mm" not in sums:
        return dict(sums)
    m, mm = sums["sum_m"], sums["sum_mm"]
    out = dict(sums)
    if _symmetric_keys(sums):
        sym = 0.5 * (mm + mm.mT)
        outer = torch.outer(m, m) / n
        evals, evecs = torch.linalg.eigh(sym - outer)
        out["sum_mm"] = (evecs * evals.clamp(min=0.0)) @ evecs.mT + outer
    elif mm.shape == m.shape:
        out["sum_mm"] = torch.maximum(mm, m.pow(2) / n)
    else:
        out["sum_mm"] = torch.maximum(mm, m.pow(2).sum(-1) / n)
    return out


@dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy of a federated fit (see :mod:`hbfl_pyro.dp`).

    Give either ``noise_multiplier`` or ``target_epsilon`` together with ``rounds`` (the
    noise multiplier is then solved for, and the run refuses to go past ``rounds``).

    :param clip: ``C``, the L2 bound of each client's message (> 0), in the message's own
        units (summaries: the local site's units; gradients: nats per parameter unit).
    :param noise_multiplier: ``z >= 0``: the noise on the sum has standard deviation
        ``z * C`` per coordinate. ``0`` clips only (no privacy: ``epsilon = inf``).
    :param delta: ``delta`` of the reported ``(epsilon, delta)``, in (0, 1).
    :param target_epsilon: solve ``z`` so that ``rounds`` rounds spend at most this.
    :param rounds: the planned number of rounds (needed with ``target_epsilon``).
    :param accountant: ``"gdp"`` (exact for composed Gaussian mechanisms) or ``"zcdp"``.
    :param reproducible_noise: derive the noise from the run's seed and the round (tests and
        benchmarks only: whoever knows the seed can remove the noise). Default: fresh
        operating-system entropy at every release.

    Example::

        >>> dp = DPConfig(clip=1.0, target_epsilon=4.3772, rounds=1)
        >>> round(dp.noise_multiplier, 3)
        1.0
        >>> DPConfig(clip=0.0, noise_multiplier=1.0)
        Traceback (most recent call last):
        ...
        ValueError: DPConfig: clip must be a finite number > 0 ...
    """

    clip: float
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5
    target_epsilon: Optional[float] = None
    rounds: Optional[int] = None
    accountant: str = "gdp"
    reproducible_noise: bool = False

    def __post_init__(self):
        # Kinds and ranges first (the table in hbfl_pyro.options), then the combinations.
        fields = {name: getattr(self, name) for name in DP_CONFIG}
        for name, value in check_options("DPConfig", fields, DP_CONFIG).items():
            object.__setattr__(self, name, value)
        _check_accountant(self.accountant)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "DPConfig: give exactly one of noise_multiplier= (then epsilon is reported) "
                "or target_epsilon= with rounds= (then the noise multiplier is solved for)"
            )
        if self.target_epsilon is not None:
            if not (isinstance(self.rounds, int) and self.rounds >= 1):
                raise ValueError(
                    f"DPConfig: target_epsilon needs rounds= (the planned number of rounds, "
                    f"an int >= 1), got rounds={self.rounds!r}"
                )
            z = noise_multiplier_for(self.target_epsilon, self.delta, self.rounds, self.accountant)
            object.__setattr__(self, "noise_multiplier", z)
        z = self.noise_multiplier
        if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
            raise ValueError(
                f"DPConfig: noise_multiplier must be a finite number >= 0, got {z!r}; "
                "0 clips without noise (no privacy), about 1 or more gives a useful epsilon"
            )

    @property
    def multiplier(self) -> float:
        """The noise multiplier as a float: the one given, or the one solved for
        ``target_epsilon`` (``__post_init__`` sets ``noise_multiplier`` either way)."""
        if self.noise_multiplier is None:  # only while __post_init__ runs
            raise RuntimeError("DPConfig: the noise multiplier is not set yet")
        return self.noise_multiplier

    # ------------------------------------------------------------------ client side
    def clip_message(self, tensors: Dict[str, torch.Tensor], where: str = "a client"):
        """Scale a message's data-dependent tensors so their joint L2 norm is at most ``clip``.

        A message within the bound is returned unchanged (bit for bit). Public keys
        (``"count"``) pass through and must hold ones.

        :param tensors: the reply's ``"stats"`` or ``"grads"``.
        :param where: names the client in errors.
        :returns: a new dict.

        Example::

            >>> dp = DPConfig(clip=1.0, noise_multiplier=1.0)
            >>> dp.clip_message({"g": torch.tensor([3.0, 4.0])})["g"]
            tensor([0.6000, 0.8000])
        """
        for key in PUBLIC_KEYS:
            if key in tensors and not bool((tensors[key] == 1).all()):
                raise ValueError(
                    f"{where}: the summary key {key!r} is treated as public and must be 1, got "
                    f"{tensors[key]}; a family whose {key!r} depends on data cannot use DPConfig"
                )
        norm = message_norm(tensors)
        if not bool(norm > self.clip):
            return dict(tensors)
        factor = self.clip / norm
        return {k: (t if k in PUBLIC_KEYS else t * factor) for k, t in tensors.items()}

    # ------------------------------------------------------------------ server side
    def noisy_sum(
        self, messages: Iterable[Dict[str, torch.Tensor]], seed: int
    ) -> Dict[str, torch.Tensor]:
        """Re-clip each message, sum them, and add ``N(0, (z clip)^2)`` to every coordinate.

        :param messages: the pool's ``"stats"`` or ``"grads"`` dicts.
        :param seed: seeds the server's own noise generator (the global RNG is untouched).
        :returns: ``{key: noisy sum}``; public keys are summed without noise.

        Example::

            >>> dp = DPConfig(clip=1.0, noise_multiplier=0.0)
            >>> dp.noisy_sum([{"g": torch.tensor([3.0, 4.0])}, {"g": torch.tensor([0.1, 0.0])}],
            ...              seed=0)["g"]
            tensor([0.7000, 0.8000])
        """
        clipped = [self.clip_message(m, "the server's re-clipping") for m in messages]
        keys = list(clipped[0])
        sums = {k: sum(m[k] for m in clipped) for k in keys}
        if self.multiplier > 0:
            gen = torch.Generator().manual_seed(seed)
            std = self.multiplier * self.clip
            for k in sorted(keys):
                if k in PUBLIC_KEYS:
                    continue
                t = sums[k]
                sums[k] = t + std * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            sums = project_moments(sums, len(clipped))
        return sums

    def noise_seed(self, run_seed: int, server_round: int) -> int:
        """The seed of one release's noise: fresh entropy, or ``(run_seed, round)`` when
        ``reproducible_noise`` (see the module docstring)."""
        if self.reproducible_noise:
            return derive_seed(run_seed, server_round, "dp")
        return secrets.randbits(63)

    # ------------------------------------------------------------------ accounting
    def epsilon(self, rounds: int) -> float:
        """``epsilon`` at this config's ``delta`` after ``rounds`` released sums."""
        return epsilon(self.multiplier, rounds, self.delta, self.accountant)

    def report(self, rounds: int) -> Dict:
        """The privacy of a run that released ``rounds`` noisy sums, as a plain dict.

        Example::

            >>> r = DPConfig(clip=1.0, noise_multiplier=1.0).report(1)
            >>> sorted(r)  # doctest: +NORMALIZE_WHITESPACE
            ['accountant', 'adjacency', 'clip', 'delta', 'epsilon', 'noise_multiplier',
             'rounds', 'threat_model']
        """
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "rounds": rounds,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "accountant": self.accountant,
            "adjacency": "client-level, add/remove (zero-out) one client's whole message",
            "threat_model": "central: trusted server adds the noise to the sum",
        }

    def check_round(self, server_round: int) -> None:
        """Refuse a round past the planned ``rounds`` when the noise was solved for a target."""
        if (
            self.target_epsilon is not None
            and self.rounds is not None
            and server_round > self.rounds
        ):
            raise RuntimeError(
                f"round {server_round} would exceed the privacy budget: DPConfig("
                f"target_epsilon={self.target_epsilon}) was solved for rounds={self.rounds}; "
                "start a new run with a DPConfig for more rounds (more noise) for a longer run"
            )
