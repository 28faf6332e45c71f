"""The embedded engine: clients are Python objects in this process.

Every message between the server and a client passes through :meth:`InProcessEngine.deliver`,
so one hook (``on_message``) sees all traffic: the privacy audit and message logging use it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from ..server import ClientFailureWarning
from .base import Engine, Failures

logger = logging.getLogger("hbfl_pyro")

#: ``on_message(direction, client_name, message)`` with direction ``"down"`` (server to
#: client) or ``"up"`` (client to server).
MessageHook = Callable[[str, str, Dict], None]


class InProcessEngine(Engine):
    """Runs a round's client updates one after another in this process.

    :param clients: ``{name: Client}``.
    :param on_message: optional hook called with every message, both directions.

    A client that raises is reported (with a :class:`ClientFailureWarning`) and left out
    of the round; the server decides whether enough clients answered.
    """

    def __init__(self, clients: Dict, on_message: Optional[MessageHook] = None):
        self.clients = clients
        self.hooks: List[MessageHook] = [on_message] if on_message is not None else []

    def deliver(self, direction: str, client: str, message: Dict) -> Dict:
        for hook in self.hooks:
            hook(direction, client, message)
        if isinstance(message, dict):  # a broken client may send anything; the server checks
            logger.debug(
                "%s %s round %s keys %s", direction, client, message.get("round"), sorted(message)
            )
        return message

    def run_round(self, messages: Dict[str, Dict]) -> Tuple[Dict[str, Dict], Failures]:
        """Deliver each message, run the client's update, and collect the replies."""
        replies: Dict[str, Dict] = {}
        failed: Failures = {}
        first_error = None
        for name, message in messages.items():
            self.deliver("down", name, message)
            try:
                reply = self.clients[name].update(message)
            except Exception as exc:  # a client crash must not take the federation down
                first_error = first_error or exc
                failed[name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"round {message.get('round')}: client {name!r} failed: "
                    f"{failed[name]}; it is left out of this round",
                    ClientFailureWarning,
                    stacklevel=2,
                )
                continue
            replies[name] = self.deliver("up", name, reply)
        if not replies and first_error is not None:
            # Every client failed: almost surely a bug in the model or guide, not a fault.
            raise RuntimeError(
                f"every client failed this round (first error: {first_error}); the "
                "server state is unchanged"
            ) from first_error
        return replies, failed
