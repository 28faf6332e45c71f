"""FedHB for neural networks: data partitioners, the hierarchy over network weights, the
FedAvg / FedProx special cases, vectorised client simulation and metrics (method.md §4-7,
evaluation.md §B-C)."""

from .baselines import FedProx, Pooled, local_only, reference_fedavg
from .data import ClientSplit, FederatedSplit, load_images, load_mnist, partition, read_idx
from .fedhb import (
    FederatedTrainer,
    FedHB,
    FedProxFamily,
    client_objective,
    diag_prior,
    fedavg_family,
    fedprox_family,
    iso_prior,
    network_model,
    prox_weight,
)
from .local import (
    LocalSpec,
    QuadraticPenalty,
    batch_schedule,
    select_clients,
    train_loop,
    train_vmap,
)
from .metrics import ece, evaluate, scores
from .mixture import (
    FedHBMixture,
    MixturePenalty,
    component_inits,
    evaluate_mixture,
    mixture_priors,
)
from .nets import FlatNet, mlp, small_cnn
from .personalised import Ditto, MeanFieldNet, PerFedAvg, PFedBayes

__all__ = [
    "ClientSplit",
    "Ditto",
    "FedHB",
    "FedHBMixture",
    "FedProx",
    "FedProxFamily",
    "FederatedSplit",
    "FederatedTrainer",
    "FlatNet",
    "LocalSpec",
    "MeanFieldNet",
    "MixturePenalty",
    "PFedBayes",
    "PerFedAvg",
    "Pooled",
    "QuadraticPenalty",
    "batch_schedule",
    "client_objective",
    "component_inits",
    "diag_prior",
    "ece",
    "evaluate",
    "evaluate_mixture",
    "fedavg_family",
    "fedprox_family",
    "iso_prior",
    "load_images",
    "load_mnist",
    "local_only",
    "mixture_priors",
    "mlp",
    "network_model",
    "partition",
    "prox_weight",
    "read_idx",
    "reference_fedavg",
    "scores",
    "select_clients",
    "small_cnn",
    "train_loop",
    "train_vmap",
]
