"""Shared helpers of the tuning-free benchmark: the models, their pooled data, site roles.

Used by ``reference.py``, ``check_twins.py`` and ``tests/test_tuning_free_models.py``;
needs no NumPyro.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from hbfl_pyro import FederatedData
from hbfl_pyro.modelfile import ModelFile, load_model_file

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models"
REFERENCES_DIR = HERE / "references"
PLATE = "clients"


def model_names() -> List[str]:
    """The benchmark's models: the stems of ``models/*.py``, sorted."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.py"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_sha256(batch: Dict[str, torch.Tensor]) -> str:
    """A digest of the collated data (keys, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        array = np.ascontiguousarray(batch[key].detach().cpu().numpy())
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def twin_source(name: str) -> str:
    """The source of the NumPyro twin ``name`` in ``numpyro_models.py``, read without
    importing NumPyro (its digest is recorded with each reference)."""
    source = (HERE / "numpyro_models.py").read_text()
    node = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name
    )
    return ast.get_source_segment(source, node)


def twin_sha256(name: str) -> str:
    return hashlib.sha256(twin_source(name).encode()).hexdigest()


@dataclass
class Site:
    """A latent site of a model on the pooled data.

    :ivar name: the site's name.
    :ivar role: ``"global"`` (outside the clients plate) or ``"local"`` (inside it).
    :ivar shape: its value's shape on the pooled data (clients plate included).
    :ivar event_shape: its event shape.
    """

    name: str
    role: str
    shape: Tuple[int, ...]
    event_shape: Tuple[int, ...]

    def summary_shape(self, num_clients: int) -> Tuple[int, ...]:
        """The shape its summaries are stored in: ``(C, *event_shape)`` for a local site
        (the plates' singleton dimensions dropped), its own shape for a global one."""
        if self.role == "local":
            return (num_clients,) + self.event_shape
        return self.shape


@dataclass
class Benchmark:
    """One benchmark model with its pooled data."""

    name: str
    model_file: ModelFile
    data: FederatedData
    batch: Dict[str, torch.Tensor]
    sites: Dict[str, Site]

    @property
    def num_clients(self) -> int:
        return len(self.data)

    @property
    def num_observations(self) -> int:
        return int(self.batch["mask"].sum())

    def arrays(self) -> Dict[str, np.ndarray]:
        """The collated data as NumPy arrays (float64, the mask boolean), for NumPyro."""
        return {k: v.detach().cpu().numpy() for k, v in self.batch.items()}


def latent_sites(model, batch) -> Dict[str, Site]:
    """The latent sites of ``model`` on ``batch``, in model order, with their roles."""
    with torch.random.fork_rng(devices=[]):
        trace = poutine.trace(model).get_trace(batch)
    sites = {}
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
            continue
        if node["infer"].get("_deterministic") or node["infer"].get("is_auxiliary"):
            continue
        frames = [f for f in node["cond_indep_stack"] if f.vectorized]
        if any(f.name == "_num_particles_vectorized" for f in frames):
            continue
        local = any(f.name == PLATE for f in frames)
        shape = tuple(node["value"].shape)
        event_shape = tuple(node["fn"].event_shape)
        if local:
            batch_shape = shape[: len(shape) - len(event_shape)]
            clients = [f for f in frames if f.name == PLATE][0]
            if batch_shape[clients.dim] != clients.size or np.prod(batch_shape) != clients.size:
                raise ValueError(
                    f"local site {name!r} has batch shape {batch_shape}: the benchmark expects "
                    "one value (of the event shape) per client"
                )
        sites[name] = Site(name, "local" if local else "global", shape, event_shape)
    return sites


def load_benchmark(name: str) -> Benchmark:
    """Load ``models/<name>.py``, its clients' data and the pooled (collated) data.

    Sets torch's default dtype to float64 (the data and references are float64).
    """
    torch.set_default_dtype(torch.float64)
    model_file = load_model_file(model_path(name))
    data = FederatedData(model_file.load_data())
    batch = data.collate()
    return Benchmark(name, model_file, data, batch, latent_sites(model_file.model, batch))
