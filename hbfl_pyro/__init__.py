"""hbfl_pyro: hierarchical Bayesian federated learning (FedHB) in Pyro.

One Pyro model of the hierarchy, with a clients plate, is fitted federated: each client
optimises its own block of the ELBO on its private data, and the server updates the global
variational factor from what clients send (never data). See Kim & Hospedales, "FedHB:
Hierarchical Bayesian Federated Learning", arXiv:2305.04979.
"""

import os as _os
import warnings as _warnings
from importlib import metadata as _metadata

# OpenMP threads that wait for work sleep instead of spinning, unless the user chose
# otherwise. libgomp reads this when torch is first imported, so it takes effect when
# hbfl_pyro comes first (always under the `hbfl` command). A fit is many small tensor
# operations: on a machine whose cores are busy, spinning threads starve each other
# (exam from the tuning-free benchmark on 2 loaded cores: 37.3 s spinning, 8.3 s
# passive; on one thread 6.5 s).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

with _warnings.catch_warnings():
    # ArviZ 0.23 announces its 1.x rewrite (a FutureWarning about ArviZ's own API) once a
    # day on import; hbfl_pyro imports ArviZ for its users, who need not see that notice
    # (issue 16). Scoped to this import: the global warning filters are left as they were.
    _warnings.filterwarnings(
        "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
    )
    import arviz as _arviz  # noqa: F401

from .client import Client, LocalConfig
from .data import DataValidationError, FederatedData, collate, num_clients
from .dp import DPConfig
from .export import compare_clients_loo, to_inference_data
from .failures import ClientFailureError
from .families import ClosedFormFamily, InverseWishart, NIWDiag, NIWFull, NIWIso, NormalNormal
from .guides import (
    AutoSplineMultivariateNormal,
    GuideError,
    LaplaceLocalNormal,
    StructuredLocalNormal,
)
from .laplace_marginal import LaplaceMarginal, MarginalClient
from .predict import new_client_predictive, personalise
from .server import ClientFailureWarning, ClosedFormServer, GradientServer, Server
from .servers import ConvergenceWarning, DifferentialPrivacy, SecondOrderServer, ServerStrategy
from .structure import ModelStructure, ModelStructureError, discover_structure
from .svi import FederatedSVI

try:
    __version__ = _metadata.version("hbfl_pyro")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AutoSplineMultivariateNormal",
    "Client",
    "ClientFailureError",
    "ClientFailureWarning",
    "ClosedFormFamily",
    "ClosedFormServer",
    "ConvergenceWarning",
    "DPConfig",
    "DataValidationError",
    "DifferentialPrivacy",
    "FederatedData",
    "FederatedSVI",
    "GradientServer",
    "GuideError",
    "InverseWishart",
    "LaplaceLocalNormal",
    "LaplaceMarginal",
    "LocalConfig",
    "MarginalClient",
    "ModelStructure",
    "ModelStructureError",
    "NIWDiag",
    "NIWFull",
    "NIWIso",
    "NormalNormal",
    "SecondOrderServer",
    "Server",
    "ServerStrategy",
    "StructuredLocalNormal",
    "collate",
    "compare_clients_loo",
    "discover_structure",
    "new_client_predictive",
    "num_clients",
    "personalise",
    "to_inference_data",
]
