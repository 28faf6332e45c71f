"""Network hygiene for every process that imports Flower or Ray.

Flower and Ray phone home by default (telemetry, update checks, usage statistics) and
may install dependencies at run time. hbfl_pyro's Flower entry points switch all of that
off *before* ``flwr`` or ``ray`` is imported, send any stray HTTP request to a closed
local port, keep Flower's state in a project-local ``FLWR_HOME``, and bind every server
(SuperLink, SuperNodes, Ray) to the loopback interface unless told otherwise.

:func:`apply_network_hygiene` sets the variables in this process;
:func:`hygienic_env` returns an environment for a subprocess (SuperLink, SuperNode,
``flwr run``). Ray workers inherit the variables from the process that starts Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

#: Variables every Flower/Ray process gets (set before ``flwr``/``ray`` is imported).
NETWORK_HYGIENE: Dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Any HTTP(S) request that is not to loopback goes to a closed local port.
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost,::1",
    "NO_PROXY": "127.0.0.1,localhost,::1",
}

#: Variables removed: they would point Ray at an existing (possibly remote) cluster.
REMOVED = ("RAY_ADDRESS",)

#: Where Flower keeps its state unless ``FLWR_HOME`` is already set (git-ignored).
DEFAULT_FLWR_HOME = ".flwr"

#: The only interface hbfl_pyro's Flower servers and Ray bind to by default.
LOOPBACK = "127.0.0.1"

#: ``ray.init`` arguments for the simulation engine: no dashboard, loopback only.
RAY_INIT_ARGS = {"include_dashboard": False, "_node_ip_address": LOOPBACK}


def hygienic_env(
    base: Optional[Mapping[str, str]] = None, flwr_home: Union[str, os.PathLike, None] = None
) -> Dict[str, str]:
    """An environment for a Flower or Ray subprocess with :data:`NETWORK_HYGIENE` applied.

    :param base: the environment to start from (default: this process's).
    :param flwr_home: Flower's state folder; default: ``base["FLWR_HOME"]`` if set, else
        ``./.flwr`` (absolute).
    :returns: a new dict; ``base`` is not changed.

    Example::

        >>> env = hygienic_env({"PATH": "/bin"}, flwr_home="/tmp/flwr")
        >>> env["FLWR_TELEMETRY_ENABLED"], env["FLWR_HOME"], env["PATH"]
        ('0', '/tmp/flwr', '/bin')
    """
    env = dict(os.environ if base is None else base)
    for key in REMOVED:
        env.pop(key, None)
    env.update(NETWORK_HYGIENE)
    home = flwr_home if flwr_home is not None else env.get("FLWR_HOME") or DEFAULT_FLWR_HOME
    env["FLWR_HOME"] = str(Path(home).absolute())
    return env


def apply_network_hygiene(flwr_home: Union[str, os.PathLike, None] = None) -> Dict[str, str]:
    """Apply :func:`hygienic_env` to this process's ``os.environ``; returns the environment.

    Call it before ``flwr`` or ``ray`` is imported (:mod:`hbfl_pyro.flower` does so on
    import). ``FLWR_HOME`` is created if missing.
    """
    env = hygienic_env(flwr_home=flwr_home)
    for key in REMOVED:
        os.environ.pop(key, None)
    for key in list(NETWORK_HYGIENE) + ["FLWR_HOME"]:
        os.environ[key] = env[key]
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


__all__ = [
    "DEFAULT_FLWR_HOME",
    "LOOPBACK",
    "NETWORK_HYGIENE",
    "RAY_INIT_ARGS",
    "apply_network_hygiene",
    "hygienic_env",
]
