"""hbfl_pyro: hierarchical Bayesian federated learning (FedHB) in Pyro.

One Pyro model of the hierarchy, with a clients plate, is fitted federated: each client
optimises its own block of the ELBO on its private data, and the server updates the global
variational factor from what clients send (never data). See Kim & Hospedales, "FedHB:
Hierarchical Bayesian Federated Learning", arXiv:2305.04979.
"""

from .client import Client, LocalConfig
from .data import DataValidationError, FederatedData, collate, num_clients
from .dp import DPConfig
from .export import compare_clients_loo, to_inference_data
from .families import ClosedFormFamily, InverseWishart, NIWDiag, NIWFull, NIWIso, NormalNormal
from .guides import GuideError
from .laplace import LaplaceLocalNormal
from .laplace_marginal import LaplaceMarginal, MarginalClient
from .predict import new_client_predictive, personalise
from .server import ClientFailureWarning, Server
from .servers import ConvergenceWarning, SecondOrderServer, ServerStrategy
from .spline_guide import AutoSplineMultivariateNormal
from .structure import ModelStructure, ModelStructureError, discover_structure
from .structured import StructuredLocalNormal
from .svi import FederatedSVI

__version__ = "0.1.0"

__all__ = [
    "AutoSplineMultivariateNormal",
    "Client",
    "ClientFailureWarning",
    "ClosedFormFamily",
    "ConvergenceWarning",
    "DPConfig",
    "DataValidationError",
    "FederatedData",
    "FederatedSVI",
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
