"""What each option accepts: one table, checked before anything runs.

:data:`FEDERATED_SVI` lists every option of :class:`~hbfl_pyro.FederatedSVI` that has a
fixed range, :data:`RUN` those of :meth:`~hbfl_pyro.FederatedSVI.run`. :func:`check`
refuses a value outside its range with the library's error -- :class:`TypeError` for a
value of the wrong kind (a string, ``None`` where a number is needed, ``2.5`` where an
integer is), :class:`ValueError` for a value out of range -- whose message names the
option, the value and the allowed range, e.g.::

    FederatedSVI: local_steps must be an integer >= 1, got 0

Integers are ints (numpy integers too), never bools or floats; numbers are finite reals
(numpy floats too), never bools or strings. ``None`` is accepted only where it means "the
default" (the first-order options, whose defaults are
:data:`~hbfl_pyro.svi.FIRST_ORDER_DEFAULTS`); ``seed=None`` is refused, since a run's
seed is always explicit (give ``seed=0``).

Example::

    >>> check("FederatedSVI", {"local_steps": 3, "server_lr": 0.1}, FEDERATED_SVI)
    {'local_steps': 3, 'server_lr': 0.1}
    >>> check("FederatedSVI", {"min_clients": 0}, FEDERATED_SVI)
    Traceback (most recent call last):
    ...
    ValueError: FederatedSVI: min_clients must be an integer >= 1, got 0
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Rule:
    """What one option accepts.

    :ivar kind: ``"integer"``, ``"number"``, ``"flag"`` (a bool), ``"choice"``, ``"text"``
        (a non-empty string) or ``"callable"``.
    :ivar low, high: the range's ends (``None``: unbounded).
    :ivar low_open, high_open: whether an end is excluded.
    :ivar choices: the allowed values of a ``"choice"``.
    :ivar optional: ``None`` is accepted (it means the default).
    :ivar hint: said after the range when a value is refused.
    :ivar text: the allowed values in words, instead of those derived from the range.
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Tuple[Any, ...] = ()
    optional: bool = False
    hint: str = ""
    text: str = ""

    @property
    def allowed(self) -> str:
        """The allowed values in words, e.g. ``"a number in (0, 1]"``."""
        if self.text:
            return self.text
        if self.kind == "flag":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "text":
            text = "a non-empty string"
        elif self.kind == "callable":
            text = "a callable"
        else:
            what = "an integer" if self.kind == "integer" else "a finite number"
            if self.low is not None and self.high is not None:
                what = "an integer" if self.kind == "integer" else "a number"
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text = f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.high is not None:
                text = f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
            else:
                text = what
        return text + (" or None (the default)" if self.optional else "")

    def check(self, owner: str, name: str, value):
        """``value`` normalised (an int, a float, a bool ...), or the error."""

        given = value

        def refuse(error):
            hint = f"; {self.hint}" if self.hint else ""
            return error(f"{owner}: {name} must be {self.allowed}, got {given!r}{hint}")

        if value is None:
            if self.optional:
                return None
            raise refuse(TypeError)
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise refuse(TypeError)
            return value
        if self.kind == "choice":
            if not any(type(value) is type(c) and value == c for c in self.choices):
                raise refuse(ValueError if isinstance(value, str) else TypeError)
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                raise refuse(TypeError)
            if not value:
                raise refuse(ValueError)
            return value
        if self.kind == "callable":
            if not callable(value):
                raise refuse(TypeError)
            return value
        if isinstance(value, bool):
            raise refuse(TypeError)
        if self.kind == "integer":
            if not isinstance(value, numbers.Integral):
                raise refuse(TypeError)
            value = int(value)
        else:
            if not isinstance(value, numbers.Real):
                raise refuse(TypeError)
            if not math.isfinite(value):
                raise refuse(ValueError)
            value = float(value)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise refuse(ValueError)
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise refuse(ValueError)
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def integer(low: Optional[int] = None, high: Optional[int] = None, **kw) -> Rule:
    return Rule("integer", low, high, **kw)


def number(low=None, high=None, low_open=False, high_open=False, **kw) -> Rule:
    return Rule("number", low, high, low_open, high_open, **kw)


def flag(**kw) -> Rule:
    return Rule("flag", **kw)


def choice(*choices, **kw) -> Rule:
    return Rule("choice", choices=tuple(choices), **kw)


def positive_number(**kw) -> Rule:
    return number(0, low_open=True, **kw)


def decay(**kw) -> Rule:
    """A per-round multiplicative decay of a step size: ``(0, 1]`` (1: no decay)."""
    return number(0, 1, low_open=True, hint="1 keeps the step size constant", **kw)


#: :class:`~hbfl_pyro.FederatedSVI`'s options with a fixed range. ``min_clients`` also
#: may not exceed the clients sampled per round, and ``engine`` must name an engine:
#: both depend on the run and are checked where it is known.
FEDERATED_SVI: Dict[str, Rule] = {
    "fraction": number(0, 1, low_open=True),
    "participation": choice("scaled", "stale", optional=True),
    "min_clients": integer(1),
    "local_steps": integer(1, optional=True),
    "local_lr": positive_number(optional=True),
    "local_lr_decay": decay(optional=True),
    "num_particles": integer(1, optional=True),
    "grad_particles": integer(1, optional=True),
    "server_lr": positive_number(optional=True),
    "lr_decay": decay(optional=True),
    "server_particles": integer(1, optional=True),
    "moment_matched": flag(optional=True),
    "tol": positive_number(hint="it is in nats of the objective, e.g. 1e-3"),
    "psis_draws": integer(100, hint="Pareto smoothing needs a tail of draws"),
    "local_draws": integer(0),
    "seed": integer(0, hint="every random choice derives from it; give e.g. seed=0"),
    "plate": Rule("text", optional=True),
    "on_message": Rule("callable", optional=True),
    "on_client_failure": choice("raise", "drop"),
}

#: :meth:`~hbfl_pyro.FederatedSVI.run`'s options. ``rounds=0`` runs no round (a resumed
#: fit that is already complete); ``None`` is the second-order server's default cap.
RUN: Dict[str, Rule] = {
    "rounds": integer(0, optional=True),
    "progress": flag(),
    "on_round": Rule("callable", optional=True),
}


#: :class:`~hbfl_pyro.dp.DPConfig`'s fields. Besides these, exactly one of
#: ``noise_multiplier`` and ``target_epsilon`` is given, ``target_epsilon`` needs
#: ``rounds``, and ``accountant`` names an accountant (checked by ``DPConfig``).
DP_CONFIG: Dict[str, Rule] = {
    "clip": positive_number(
        text="a finite number > 0 (the L2 bound of one client's message)",
        hint="pick it near a typical message norm (see dp.message_norm)",
    ),
    "noise_multiplier": number(
        0,
        optional=True,
        text="a finite number >= 0",
        hint="0 clips without noise (no privacy), about 1 or more gives a useful epsilon",
    ),
    "delta": number(
        0,
        1,
        low_open=True,
        high_open=True,
        text="in (0, 1)",
        hint="use e.g. 1e-5, below 1 / (number of clients)",
    ),
    "target_epsilon": positive_number(optional=True, text="> 0 (and finite)"),
    "rounds": integer(1, optional=True, hint="the planned number of rounds"),
    "reproducible_noise": flag(),
}


def check(owner: str, values: Mapping[str, Any], table: Mapping[str, Rule]) -> Dict[str, Any]:
    """``values`` checked against ``table`` (keys not in it pass unchanged), normalised.

    :param owner: names the caller in errors (``"FederatedSVI"``, ``"run()"``, ...).
    :raises TypeError: a value of the wrong kind, naming the option, value and range.
    :raises ValueError: a value out of range, naming the option, value and range.
    """
    return {
        name: table[name].check(owner, name, value) if name in table else value
        for name, value in values.items()
    }


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    """The known name closest to a misspelled ``name`` (``difflib``), or ``None``.

    Example::

        >>> closest("lcoal_lr", ["local_lr", "server_lr", "seed"])
        'local_lr'
    """
    found = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys_message(unknown: Sequence[str], known: Iterable[str]) -> str:
    """``'lcoal_lr' (did you mean 'local_lr'?), ...`` for each unknown key."""
    known = list(known)
    parts = []
    for key in unknown:
        guess = closest(key, known)
        parts.append(f"{key!r}" + (f" (did you mean {guess!r}?)" if guess else ""))
    return ", ".join(parts)
