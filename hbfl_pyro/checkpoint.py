"""Safe checkpoint files: atomic, versioned, tied to one model, loaded without pickle's code.

A checkpoint holds a run's state (:meth:`~hbfl_pyro.FederatedSVI.state_dict`: plain dicts,
lists and tuples of tensors, numbers, strings, booleans and ``None``) with a format version
and the *fingerprint* of the model it belongs to (its sites, their shapes, its clients, its
server; :meth:`~hbfl_pyro.FederatedSVI.fingerprint`). It is

- written atomically: to a temporary file in the same directory, flushed to disk, then
  renamed over ``path`` (``os.replace``), so a crash or a kill mid-write leaves the previous
  checkpoint whole, never a partial one;
- read with ``torch.load(..., weights_only=True)``: a file that holds anything but tensors
  and plain containers is refused *before* any of it is built, so loading a checkpoint from
  someone else cannot run code;
- checked before it is used: a truncated or corrupt file, a file that is not a checkpoint, a
  checkpoint of another model (the differing sites are named) and one of a newer format
  each raise :class:`CheckpointError`, naming the file and the fix.
"""

from __future__ import annotations

import os
import pickle
import reprlib
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

#: The ``format`` entry of every checkpoint file: tells a checkpoint from other torch files.
FORMAT = "hbfl_pyro.checkpoint"

#: The newest format version this library writes and reads. Raise it when the layout of
#: the file or of the state changes, so that an older library refuses a newer file
#: instead of misreading it.
VERSION = 1

_ZIP_MAGIC = b"PK\x03\x04"

_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: corrupt, not a checkpoint, of another model, too new."""


def save_checkpoint(state: Dict, path: Union[str, os.PathLike], fingerprint: Dict) -> None:
    """Write ``state`` to ``path`` atomically, with the format version and ``fingerprint``.

    :param state: plain dicts, lists and tuples of tensors, ``bool``, ``int``, ``float``,
        ``str`` and ``None`` (what ``torch.load(..., weights_only=True)`` reads back).
    :param path: the checkpoint file; its directory must exist. An existing file is
        replaced only once the new one is complete.
    :param fingerprint: what the state belongs to (plain values, as ``state``);
        :func:`load_checkpoint` refuses the file unless given an equal one.
    :raises TypeError: naming the first entry of ``state`` or ``fingerprint`` that is not
        plain (it could not be loaded safely); nothing is written then.

    Example::

        >>> import os, tempfile, torch
        >>> from hbfl_pyro.checkpoint import save_checkpoint, load_checkpoint
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = os.path.join(folder.name, "run.pt")
        >>> fingerprint = {"server": "gradient", "global sites": {"mu": []}}
        >>> save_checkpoint({"round": 3, "mu": torch.tensor([0.5])}, path, fingerprint)
        >>> load_checkpoint(path, fingerprint)
        {'round': 3, 'mu': tensor([0.5000])}
        >>> load_checkpoint(path, {"server": "gradient", "global sites": {"mu": [2]}})
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
          ...
        hbfl_pyro.checkpoint.CheckpointError: .../run.pt is a checkpoint of another model or
        settings: global sites['mu']: [] in the checkpoint, [2] here. Resume with ...
        >>> folder.cleanup()
    """
    _check_plain(state, "state")
    _check_plain(fingerprint, "fingerprint")
    payload = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "state": state}
    path = Path(path)
    # The temporary file lies in the same directory, so the rename below never crosses a
    # file system and is atomic: readers see the old checkpoint or the new one, never half.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        # A failed (or interrupted) write leaves no partial file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def load_checkpoint(path: Union[str, os.PathLike], fingerprint: Optional[Dict] = None) -> Dict:
    """Read a state written by :func:`save_checkpoint`, without running any of its code.

    :param path: the checkpoint file.
    :param fingerprint: the loading run's fingerprint; the file is refused unless its own
        is equal (``None`` skips the check).
    :returns: the state.
    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: if the file is truncated or corrupt, holds objects other than
        tensors and plain containers, is not a checkpoint, is of a newer format, or
        belongs to another model (naming the entries that differ).
    """
    path = Path(path)
    # Opened here, so that a missing or unreadable file raises its own OSError; whatever
    # torch.load raises on the open file is about its contents (a truncated zip archive
    # can even surface as an OSError from torch's reader).
    with open(path, "rb") as f:
        # Checkpoints are torch zip archives. Anything else would reach torch's legacy
        # loader, whose refusal of stray bytes reads like a refusal of unsafe objects.
        if f.read(4) != _ZIP_MAGIC:
            raise _corrupt(path, ValueError("it is not a zip archive, as torch.save writes"))
        f.seek(0)
        try:
            payload = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise CheckpointError(
                    f"{path} holds objects other than tensors and plain containers, and "
                    "loading them could run code, so it was refused. Load only checkpoints "
                    "written by FederatedSVI.checkpoint or hbfl fit --checkpoint"
                ) from None
            raise _corrupt(path, exc) from None
        except Exception as exc:  # torch's zip reader and pickle fail in many ways on bad bytes
            raise _corrupt(path, exc) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an hbfl_pyro checkpoint (a torch file without the "
            f"{FORMAT!r} format entry); give a file written by FederatedSVI.checkpoint or "
            "hbfl fit --checkpoint"
        )
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has no valid format version ({version!r}); it is corrupt")
    if version > VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format version {version}, newer than this "
            f"hbfl_pyro reads (up to {VERSION}); upgrade hbfl_pyro to resume it"
        )
    if fingerprint is not None and payload.get("fingerprint") != fingerprint:
        differences = "; ".join(differ(payload.get("fingerprint"), fingerprint))
        raise CheckpointError(
            f"{path} is a checkpoint of another model or settings: {differences}. Resume "
            "with the model, data and options it was written with, or start a new run"
        )
    return payload["state"]


def differ(saved: Any, here: Any, where: str = "") -> List[str]:
    """The entries in which two fingerprints differ, as ``"where: saved in the
    checkpoint, here here"`` lines (dicts compared key by key)."""
    if isinstance(saved, dict) and isinstance(here, dict):
        lines = []
        for key in list(saved) + [k for k in here if k not in saved]:
            place = f"{where}[{key!r}]" if where else str(key)
            if key not in here:
                lines.append(f"{place}: {_short(saved[key])} in the checkpoint, missing here")
            elif key not in saved:
                lines.append(f"{place}: missing in the checkpoint, {_short(here[key])} here")
            else:
                lines.extend(differ(saved[key], here[key], place))
        return lines
    if saved == here:
        return []
    return [f"{where or 'fingerprint'}: {_short(saved)} in the checkpoint, {_short(here)} here"]


def _short(value: Any) -> str:
    # A federation's client list can be long: the message names what differs, briefly.
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = 8
_REPR.maxstring = _REPR.maxother = 80


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return CheckpointError(
        f"{path} is truncated or corrupt, or not a checkpoint file, and cannot be read "
        f"({reason}); resume from an intact checkpoint, or start a new run"
    )


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything ``torch.load(..., weights_only=True)`` would not read back."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or (
        isinstance(obj, torch.Tensor) and type(obj) not in (torch.Tensor, torch.nn.Parameter)
    ):
        raise TypeError(
            f"{where} is a {type(obj).__name__}: a checkpoint holds only tensors, numbers, "
            "strings, booleans, None and dicts, lists and tuples of them (so that it loads "
            "without running code); convert it first"
        )


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CheckpointError", "FORMAT", "VERSION", "load_checkpoint", "save_checkpoint"]
