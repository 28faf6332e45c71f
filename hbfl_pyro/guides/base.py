"""The declared base of the library's conditional local factors ``q_i(theta_i | phi)``.

A local factor is either one of Pyro's autoguides over the client's local sites (the
mean-field default; built by :func:`~hbfl_pyro.guides.build.build_local_guide`) or a
:class:`ConditionalLocalGuide`: a factor that takes the round's draws of the globals
(``guide(data, globals=...)``), is built per client by its class (:meth:`for_client`),
and is recentred at the round's ``q(phi)`` before the client's steps (:meth:`recentre`).
The library asks ``isinstance(guide, ConditionalLocalGuide)``, never which attributes a
guide happens to have. :class:`~hbfl_pyro.StructuredLocalNormal` and
:class:`~hbfl_pyro.LaplaceLocalNormal` are the two in the library.

Example::

    >>> from hbfl_pyro import LaplaceLocalNormal, StructuredLocalNormal
    >>> issubclass(StructuredLocalNormal, ConditionalLocalGuide)
    True
    >>> builds_itself(LaplaceLocalNormal), builds_itself("auto")
    (True, False)
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from pyro.nn import PyroModule


class ConditionalLocalGuide(PyroModule):
    """Base of a local factor ``q_i(theta_i | phi)`` conditioned on the globals.

    Subclasses define ``forward(data, globals=None)`` (the local sites' draws given the
    globals' draws), :meth:`for_client` and :meth:`recentre`.
    """

    #: The library passes the round's draws of the global sites as ``globals=``.
    needs_globals = True
    #: Whether the vectorised engine recentres all of a round's clients in one call
    #: (``True``) or each client's factor on its own (``False``).
    batched_recentre = False

    @classmethod
    def for_client(cls, model, structure, batch) -> "ConditionalLocalGuide":
        """A fresh factor prototyped on ``batch`` (one client, or a batch of clients)."""
        raise NotImplementedError(f"{cls.__name__}.for_client")

    def recentre(self, globals: Dict[str, torch.Tensor], data=None) -> None:
        """Move the factor's centre to the round's draws of the globals (``globals``:
        ``{site: (draws, ...)}``)."""
        raise NotImplementedError(f"{type(self).__name__}.recentre")


def is_conditional(guide: Any) -> bool:
    """Whether ``guide`` (a fitted factor) is a :class:`ConditionalLocalGuide`."""
    return isinstance(guide, ConditionalLocalGuide)


def builds_itself(spec: Optional[Any]) -> bool:
    """Whether ``spec`` is a :class:`ConditionalLocalGuide` class (it builds each client's
    factor with :meth:`~ConditionalLocalGuide.for_client`)."""
    return isinstance(spec, type) and issubclass(spec, ConditionalLocalGuide)


__all__ = ["ConditionalLocalGuide", "builds_itself", "is_conditional"]
