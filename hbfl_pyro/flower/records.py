"""Library messages and client state <-> Flower records, exactly.

hbfl_pyro's messages (:meth:`hbfl_pyro.Server.message`, :meth:`hbfl_pyro.Client.update`)
and a client's state (:meth:`hbfl_pyro.Client.state_dict`) are trees of dicts, lists,
tuples, scalars and tensors. A tree is split into

* an :class:`~flwr.app.ArrayRecord` holding every tensor (NumPy's own format: dtype and
  shape kept, float64 bit for bit), keyed by its path in the tree, and
* a :class:`~flwr.app.ConfigRecord` holding the tree's skeleton as JSON, with each tensor
  replaced by its key. Dict keys keep their type (an optimiser state is keyed by ints)
  and tuples stay tuples; Python floats survive JSON exactly (shortest round-trip repr).

so that :func:`decode` inverts :func:`encode` exactly: what the client computes from a
decoded message is what it computes in process.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np
import torch

#: Record names inside a RecordDict (``{prefix}.arrays`` and ``{prefix}.tree``).
DEFAULT_PREFIX = "hbfl"
_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def flatten(tree: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Split a tree into a JSON-able skeleton and ``{key: tensor}``.

    :param tree: nested dicts (any JSON-scalar keys), lists, tuples, ``None``, bools,
        ints, floats, strings and tensors.
    :returns: ``(skeleton, tensors)``.
    :raises TypeError: naming the path of a value of another type.

    Example::

        >>> skeleton, tensors = flatten({"round": 3, "stats": {"m": torch.zeros(2)}})
        >>> list(tensors), unflatten(skeleton, tensors)["round"]
        (['stats/m'], 3)
    """
    tensors: Dict[str, torch.Tensor] = {}

    def visit(value, path: str):
        if isinstance(value, torch.Tensor):
            key = path or "."
            if key in tensors:  # two paths that print alike, e.g. keys 1 and "1"
                key = f"{key}#{len(tensors)}"
            tensors[key] = value.detach()
            # The shape is kept here too: Flower's Array stores a 0-d array as 1-d.
            return {_TENSOR: key, "shape": list(value.shape)}
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise TypeError(f"{path or 'tree'}: dict key {k!r} is not a JSON scalar")
                items.append([k, visit(v, f"{path}/{k}" if path else str(k))])
            return {_DICT: items}
        if isinstance(value, tuple):
            return {_TUPLE: [visit(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [visit(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(
            f"{path or 'tree'}: cannot put a {type(value).__name__} in a Flower record "
            "(only dicts, lists, tuples, scalars, strings and tensors)"
        )

    return visit(tree, ""), tensors


def unflatten(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Invert :func:`flatten`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]].reshape(skeleton["shape"])
        if _TUPLE in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton[_TUPLE])
        return {k: unflatten(v, tensors) for k, v in skeleton[_DICT]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def to_array_record(tensors: Dict[str, torch.Tensor]):
    """``{key: tensor}`` as an :class:`~flwr.app.ArrayRecord` (dtype and shape kept)."""
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for key, tensor in tensors.items():
        record[key] = Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))
    return record


def from_array_record(record) -> Dict[str, torch.Tensor]:
    """An :class:`~flwr.app.ArrayRecord` as ``{key: tensor}`` (writable copies)."""
    return {key: torch.from_numpy(np.array(a.numpy(), copy=True)) for key, a in record.items()}


def encode(tree: Any, prefix: str = DEFAULT_PREFIX) -> Dict[str, Any]:
    """A tree as two records: ``{f"{prefix}.arrays": ArrayRecord, f"{prefix}.tree": ConfigRecord}``.

    Put them in a :class:`~flwr.app.RecordDict` (a message's content or a context's state).
    """
    from flwr.app import ConfigRecord

    skeleton, tensors = flatten(tree)
    return {
        f"{prefix}.arrays": to_array_record(tensors),
        f"{prefix}.tree": ConfigRecord({"skeleton": json.dumps(skeleton, allow_nan=True)}),
    }


def decode(records, prefix: str = DEFAULT_PREFIX) -> Any:
    """Invert :func:`encode`; ``records`` is any mapping holding the two records."""
    skeleton = json.loads(str(records[f"{prefix}.tree"]["skeleton"]))
    return unflatten(skeleton, from_array_record(records[f"{prefix}.arrays"]))


def has_tree(records, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether ``records`` holds a tree written by :func:`encode` under ``prefix``."""
    return f"{prefix}.tree" in records and f"{prefix}.arrays" in records


def record_dict(tree: Any, prefix: str = DEFAULT_PREFIX):
    """A :class:`~flwr.app.RecordDict` holding ``tree`` (a message's content)."""
    from flwr.app import RecordDict

    return RecordDict(encode(tree, prefix))


def num_bytes(records, prefix: str = DEFAULT_PREFIX) -> int:
    """Payload bytes of an encoded tree: array buffers plus the JSON skeleton."""
    arrays = records[f"{prefix}.arrays"]
    skeleton = str(records[f"{prefix}.tree"]["skeleton"])
    return int(sum(len(a.data) for a in arrays.values())) + len(skeleton.encode())


__all__ = [
    "decode",
    "encode",
    "flatten",
    "from_array_record",
    "has_tree",
    "num_bytes",
    "record_dict",
    "to_array_record",
    "unflatten",
]
