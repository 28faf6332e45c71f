"""Client data: validation, and collation of several clients into one model input.

A client's data is a mapping ``{name: tensor}``. Tensors with one or more dimensions are
*per-observation*: their first dimension counts the client's observations (all such
tensors of a client must agree on it). Zero-dimensional tensors, and keys listed in
``per_client``, are *per-client* values (a school's standard error, a county's uranium).

:func:`collate` turns a list of clients into the dict a model receives: per-client values
are stacked to shape ``(C, ...)``; per-observation values are padded to
``(C, n_max, ...)`` and a boolean ``"mask"`` of shape ``(C, n_max)`` marks the real rows.
Padding repeats a client's first observation, so padded rows always lie in the support of
the likelihood (a zero standard error would not); the model must apply
``poutine.mask(mask=data["mask"])`` to the observation plate, the usual Pyro idiom for
ragged groups. Collating *all* clients gives the pooled data for plain Pyro SVI or NUTS;
collating one client gives what that client feeds its own block of the ELBO.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ClientData = Dict[str, torch.Tensor]
MASK_KEY = "mask"


class DataValidationError(ValueError):
    """Raised when client data cannot be fitted; the message names the client and key."""


def _as_tensor(value, client: str, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            array = np.asarray(value)
        except Exception as exc:  # pragma: no cover - numpy accepts nearly anything
            raise DataValidationError(
                f"client {client!r}, key {key!r}: cannot convert {type(value).__name__} to a tensor"
            ) from exc
        if array.dtype == object:
            raise DataValidationError(
                f"client {client!r}, key {key!r}: values are ragged or not numeric; "
                "give a numeric array or tensor"
            )
        if array.dtype.kind not in "biufc":  # strings, bytes, dates
            raise DataValidationError(
                f"client {client!r}, key {key!r}: values of dtype {array.dtype} are not "
                "numbers; convert them (e.g. encode categories as integer codes)"
            )
        tensor = torch.as_tensor(array)
    if tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


class FederatedData:
    """The clients of a federation, each with its own private data.

    :param clients: a mapping ``{client_name: {key: array}}`` or a sequence of such dicts
        (then the clients are named ``"0"``, ``"1"``, ...).
    :param per_client: keys whose values are per-client even though they have dimensions
        (e.g. a vector of group-level covariates).

    Every check runs up front, so bad data fail before any training, with the client and
    the key named.

    Example::

        >>> import torch
        >>> data = FederatedData({"a": {"y": torch.tensor([1.0, 2.0])},
        ...                       "b": {"y": torch.tensor([0.5])}})
        >>> batch = data.collate()
        >>> batch["y"].shape, batch["mask"].tolist()
        (torch.Size([2, 2]), [[True, True], [True, False]])
    """

    def __init__(
        self,
        clients: Union[Mapping[str, Mapping], Sequence[Mapping]],
        per_client: Iterable[str] = (),
    ):
        if isinstance(clients, FederatedData):
            clients, per_client = clients.as_dict(), clients.per_client
        if isinstance(clients, Mapping):
            items = [(str(name), client) for name, client in clients.items()]
        else:
            items = [(str(i), client) for i, client in enumerate(clients)]
        if not items:
            raise DataValidationError("no clients: give at least one client's data")
        self.per_client: Tuple[str, ...] = tuple(per_client)
        self.names: List[str] = [name for name, _ in items]
        if len(set(self.names)) != len(self.names):
            repeated = sorted({n for n in self.names if self.names.count(n) > 1})
            raise DataValidationError(
                f"client names must be unique, but {repeated} occur more than once (as "
                "strings); give every client its own name"
            )
        self._clients: List[ClientData] = [
            self._validate_client(name, client) for name, client in items
        ]
        self._check_schema()
        unknown = [key for key in self.per_client if key not in self._clients[0]]
        if unknown:
            raise DataValidationError(
                f"per_client key(s) {unknown} are not keys of the clients' data (keys: "
                f"{sorted(self._clients[0])}); list only existing keys in `per_client`"
            )

    # ----------------------------------------------------------------- validation
    def _validate_client(self, name: str, client: Mapping) -> ClientData:
        if not isinstance(client, Mapping):
            raise DataValidationError(
                f"client {name!r}: data must be a mapping {{key: array}}, got "
                f"{type(client).__name__}; give each client a dict of arrays or tensors"
            )
        if MASK_KEY in client:
            raise DataValidationError(
                f"client {name!r}: the key {MASK_KEY!r} is reserved for the padding mask"
            )
        tensors = {key: _as_tensor(value, name, key) for key, value in client.items()}
        if not tensors:
            raise DataValidationError(
                f"client {name!r} has no data (an empty mapping); drop it from the federation "
                "or give it the same keys as the other clients"
            )
        lengths = {
            key: t.shape[0] for key, t in tensors.items() if self._is_per_observation(key, t)
        }
        if len(set(lengths.values())) > 1:
            raise DataValidationError(
                f"client {name!r}: per-observation arrays disagree on the number of "
                f"observations {lengths}; give every per-observation array the same "
                "first dimension, or list per-client keys in `per_client`"
            )
        if lengths and next(iter(lengths.values())) == 0:
            raise DataValidationError(
                f"client {name!r} is empty (0 observations); drop it from the federation"
            )
        for key, t in tensors.items():
            if t.is_floating_point() or t.is_complex():
                bad = ~torch.isfinite(t)
                if bad.any():
                    first = tuple(int(i) for i in bad.nonzero()[0])
                    raise DataValidationError(
                        f"client {name!r}, key {key!r}: {int(bad.sum())} value(s) are NaN "
                        f"or Inf (first at index {first}); clean or impute them before fitting"
                    )
            if t.is_floating_point():
                # A value whose square overflows cannot be scored by any likelihood with a
                # quadratic term: the client would fail every round.
                limit = math.sqrt(torch.finfo(t.dtype).max)
                huge = t.abs() >= limit
                if huge.any():
                    first = tuple(int(i) for i in huge.nonzero()[0])
                    raise DataValidationError(
                        f"client {name!r}, key {key!r}: {int(huge.sum())} value(s) of "
                        f"magnitude >= {limit:.3g} (first at index {first}: "
                        f"{float(t[first]):.3g}), whose square overflows {t.dtype}; rescale "
                        "the data (e.g. to thousands or millions) before fitting"
                    )
        return tensors

    def _is_per_observation(self, key: str, tensor: torch.Tensor) -> bool:
        return tensor.dim() > 0 and key not in self.per_client

    def _check_schema(self) -> None:
        ref_name, ref = self.names[0], self._clients[0]
        for name, client in zip(self.names[1:], self._clients[1:]):
            missing = sorted(set(ref) - set(client))
            extra = sorted(set(client) - set(ref))
            if missing or extra:
                raise DataValidationError(
                    f"client {name!r} has keys {sorted(client)}, but client {ref_name!r} has "
                    f"{sorted(ref)} (missing {missing}, extra {extra}); every client needs "
                    "the same keys"
                )
            for key, t in client.items():
                r = ref[key]
                per_obs = self._is_per_observation(key, r)
                got = t.shape[1:] if per_obs else t.shape
                want = r.shape[1:] if per_obs else r.shape
                if t.dim() != r.dim() or got != want:
                    dims = ("n",) + tuple(want) if per_obs else tuple(want)
                    shape = (
                        "(" + ", ".join(str(d) for d in dims) + (",)" if len(dims) == 1 else ")")
                    )
                    fix = (
                        "per-observation key: only its first dimension, the number of "
                        "observations, may differ between clients"
                        if per_obs
                        else "per-client key"
                    )
                    fix = f"{fix}; give every client's {key!r} the shape {shape}"
                    raise DataValidationError(
                        f"client {name!r}, key {key!r}: shape {tuple(t.shape)} does not match "
                        f"shape {tuple(r.shape)} of client {ref_name!r} ({fix})"
                    )
                if t.is_floating_point() != r.is_floating_point():
                    raise DataValidationError(
                        f"client {name!r}, key {key!r}: dtype {t.dtype} does not match "
                        f"dtype {r.dtype} of client {ref_name!r}; give every client's {key!r} the "
                        "same kind of values (all floating point or all integer)"
                    )

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._clients)

    def __getitem__(self, index: int) -> ClientData:
        return self._clients[index]

    def as_dict(self) -> Dict[str, ClientData]:
        return dict(zip(self.names, self._clients))

    def num_observations(self, index: int) -> int:
        """Rows of the client's per-observation arrays (1 when it has none)."""
        client = self._clients[index]
        for key, t in client.items():
            if self._is_per_observation(key, t):
                return int(t.shape[0])
        return 1

    def collate(self, indices: Optional[Sequence[int]] = None) -> ClientData:
        """The model input for the clients at ``indices`` (all clients by default)."""
        indices = range(len(self)) if indices is None else indices
        return collate([self._clients[i] for i in indices], per_client=self.per_client)

    def placeholder(self) -> ClientData:
        """A one-client, one-observation input of the right schema holding no client's values.

        The server runs the model on it only to evaluate the prior of the global sites,
        which validation has checked do not depend on client data.
        """
        fake = {}
        for key, t in self._clients[0].items():
            shape = (1,) + tuple(t.shape[1:]) if self._is_per_observation(key, t) else t.shape
            fake[key] = torch.ones(shape, dtype=t.dtype)
        return collate([fake], per_client=self.per_client)


def collate(clients: Sequence[ClientData], per_client: Iterable[str] = ()) -> ClientData:
    """Stack clients into one model input (see the module docstring for the layout)."""
    per_client = set(per_client)
    keys = list(clients[0])
    out: ClientData = {}
    per_obs = [k for k in keys if clients[0][k].dim() > 0 and k not in per_client]
    n = [int(c[per_obs[0]].shape[0]) for c in clients] if per_obs else []
    n_max = max(n) if n else 0
    for key in keys:
        if key in per_obs:
            rows = []
            for c, n_i in zip(clients, n):
                t = c[key]
                if n_i < n_max:
                    pad = t[:1].expand((n_max - n_i,) + tuple(t.shape[1:]))
                    t = torch.cat([t, pad])
                rows.append(t)
            out[key] = torch.stack(rows)
        else:
            out[key] = torch.stack([c[key] for c in clients])
    if per_obs:
        out[MASK_KEY] = torch.arange(n_max).expand(len(clients), n_max) < torch.tensor(n)[:, None]
    return out


def num_clients(data: ClientData) -> int:
    """The number of clients in a collated model input (its leading dimension)."""
    return int(next(iter(data.values())).shape[0])
