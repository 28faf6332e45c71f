"""Loading a *model file*: one Python file that defines a model and its clients' data.

The protocol (what ``hbfl fit`` reads):

* ``model(data)`` -- required: a Pyro model taking one collated data dict, with a plate
  named ``"clients"`` (see :mod:`hbfl_pyro.data`), or one plate of another name with an
  entry per client (taken with a warning; ``fit_options = {"plate": NAME}`` names it).
  Another callable of the file can be chosen with a ``FILE:NAME`` suffix, e.g.
  ``models/eight_schools.py:centered``.
* ``load_data()`` -- required: returns ``{client_name: {key: array}}``.
* ``global_guide``, ``local_guide``, ``server`` -- optional: passed to
  :class:`~hbfl_pyro.FederatedSVI` as the keywords of the same names.
* ``per_client`` -- optional: a tuple of keys that are per-client values.
* ``fit_options`` -- optional: a dict of :class:`~hbfl_pyro.FederatedSVI` keyword
  defaults, plus ``"rounds"``; command-line flags override them. Instead of the per-round
  ``lr_decay`` / ``local_lr_decay`` it may state ``lr_decay_over_run`` /
  ``local_lr_decay_over_run``: the factor by which the step size falls over the whole run,
  spread over however many rounds are run (``hbfl fit --rounds`` keeps the schedule's shape).
* ``guide_options`` -- optional: ``{family: dict}``, settings for a named guide family
  (:data:`~hbfl_pyro.guides.build.GUIDE_FAMILIES`: ``"structured"``, ``"full-rank"``, ...) that
  override entries of ``fit_options`` when that family is chosen (``hbfl fit --guide
  structured``; ``load_model_file(..., guide="structured")``). Richer guides usually need
  more rounds or smaller server steps than the mean-field settings.

The file is imported by path (it need not be on ``sys.path`` nor be part of a package);
its own directory is on ``sys.path`` only while it is imported, so it can import helper
modules that sit next to it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .options import FEDERATED_SVI, closest
from .options import check as check_options

DEFAULT_ATTRIBUTE = "model"
#: Module attributes passed to FederatedSVI under the same keyword.
SVI_ATTRIBUTES = ("global_guide", "local_guide", "server", "per_client")


class ModelFileError(ValueError):
    """A model file cannot be used; the message names the file and what to add or fix."""


@dataclass
class ModelFile:
    """A loaded model file.

    :ivar path: the file's path, as given.
    :ivar attribute: the name of the model callable in the file.
    :ivar module: the imported module.
    :ivar model: the Pyro model.
    :ivar load_data: the file's ``load_data`` function.
    :ivar options: :class:`~hbfl_pyro.FederatedSVI` keywords from the file (its
        ``global_guide``/``local_guide``/``server``/``per_client`` attributes, then its
        ``fit_options`` without ``"rounds"``).
    :ivar rounds: ``fit_options["rounds"]`` if given, else ``None``.
    :ivar decay_over_run: ``{"lr_decay": total, ...}`` for the decays stated over the whole
        run; :attr:`options` holds them as per-round factors for :attr:`rounds` rounds.
    :ivar guide: the guide family chosen when loading, if any.
    """

    path: Path
    attribute: str
    module: ModuleType
    model: Callable
    load_data: Callable
    options: Dict[str, Any] = field(default_factory=dict)
    rounds: Optional[int] = None
    decay_over_run: Dict[str, float] = field(default_factory=dict)
    guide: Optional[str] = None

    def options_for(self, rounds: int) -> Dict[str, Any]:
        """:attr:`options` with the decays stated over the run spread over ``rounds``.

        Example::

            >>> mf = load_model_file("models/eight_schools.py", guide="mean-field")
            >>> mf.rounds, round(mf.options_for(100)["lr_decay"] ** 100, 12)
            (300, 0.01)
        """
        out = dict(self.options)
        for key, total in self.decay_over_run.items():
            out[key] = total ** (1.0 / rounds) if rounds > 0 else 1.0
        return out

    @property
    def label(self) -> str:
        """``FILE`` or ``FILE:NAME`` as a user would type it."""
        if self.attribute == DEFAULT_ATTRIBUTE:
            return str(self.path)
        return f"{self.path}:{self.attribute}"


def parse_model_spec(spec: Union[str, os.PathLike]) -> Tuple[Path, str]:
    """Split ``FILE[:NAME]`` into the file's path and the model attribute's name.

    :param spec: a path, optionally followed by ``:NAME`` (a Python identifier).
    :returns: ``(path, name)``; ``name`` is ``"model"`` when no suffix is given.

    Example::

        >>> parse_model_spec("models/eight_schools.py:centered")
        (PosixPath('models/eight_schools.py'), 'centered')
        >>> parse_model_spec("models/normal_normal.py")[1]
        'model'
    """
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    # A Windows drive ("C:\\models\\m.py") also contains a colon: only an identifier after
    # the last colon, with something longer than a drive letter before it, is a suffix.
    if sep and tail.isidentifier() and len(head) > 1:
        return Path(head), tail
    return Path(text), DEFAULT_ATTRIBUTE


def _module_name(path: Path) -> str:
    # Prefixed so a file called e.g. ``types.py`` or ``model.py`` never shadows (or is
    # shadowed by) an importable module of the same name in ``sys.modules``.
    stem = re.sub(r"\W", "_", path.stem)
    return f"_hbfl_model_{stem}"


def _import_file(path: Path) -> ModuleType:
    name = _module_name(path)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    if spec is None:  # not with a loader given
        raise ModelFileError(f"cannot import model file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    directory = str(path.parent)
    # Registered before running, as ``import`` does: dataclasses and pickling of objects
    # defined in the file look their module up in ``sys.modules``.
    sys.modules[name] = module
    sys.path.insert(0, directory)
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        # Remove our own entry only (the file may itself have edited sys.path).
        if directory in sys.path:
            sys.path.remove(directory)
    return module


#: fit_options keys stating a decay over the whole run -> the per-round keyword.
_OVER_RUN = {"lr_decay_over_run": "lr_decay", "local_lr_decay_over_run": "local_lr_decay"}


def _decays_over_run(fit_options: Dict[str, Any], rounds: Optional[int]) -> Dict[str, float]:
    """Pop the ``*_over_run`` keys of ``fit_options``; returns ``{keyword: total}``."""
    over_run = {}
    for key, target in _OVER_RUN.items():
        if key not in fit_options:
            continue
        total = fit_options.pop(key)
        if target in fit_options:
            raise ValueError(f"fit_options gives both {key!r} and {target!r}; keep one")
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 < total <= 1:
            raise ValueError(
                f"fit_options[{key!r}] must be a number in (0, 1] (the factor by which the "
                f"step size falls over the whole run), got {total!r}"
            )
        over_run[target] = float(total)
    if over_run and rounds is None:
        raise ValueError(f"fit_options states {sorted(over_run)} over the run; give 'rounds'")
    return over_run


def fit_settings(
    fit_options: Dict[str, Any], rounds: Optional[int] = None
) -> Tuple[Dict[str, Any], Optional[int]]:
    """A model file's ``fit_options`` as :class:`~hbfl_pyro.FederatedSVI` keywords and a
    number of rounds (``rounds``, else the dict's ``"rounds"``), the decays stated over the
    run spread over those rounds.

    Example::

        >>> options, rounds = fit_settings({"rounds": 4, "lr_decay_over_run": 0.01})
        >>> rounds, round(options["lr_decay"], 12)
        (4, 0.316227766017)
    """
    options = dict(fit_options)
    file_rounds = options.pop("rounds", None)
    rounds = file_rounds if rounds is None else rounds
    for key, total in _decays_over_run(options, rounds).items():
        options[key] = total ** (1.0 / rounds) if rounds > 0 else 1.0
    return options, rounds


def _checked_fit_options(path: Path, raw, what: str, fallback_rounds: Optional[int] = None):
    """``(options, rounds, over_run)`` from a file's ``fit_options``-like dict, checked;
    decays over the run may rely on ``fallback_rounds`` when the dict gives no rounds."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ModelFileError(
            f"{path}: {what} must be a dict of FederatedSVI keywords (and 'rounds'), "
            f"got {type(raw).__name__}"
        )
    fit_options = dict(raw or {})
    rounds = fit_options.pop("rounds", None)
    try:
        over_run = _decays_over_run(fit_options, rounds if rounds is not None else fallback_rounds)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {what}: {exc}") from exc
    allowed = _svi_keywords()
    unknown = sorted(set(fit_options) - set(allowed))
    if unknown:
        known = ("rounds", *_OVER_RUN, *allowed)
        raise ModelFileError(
            f"{path}: unknown {what} {unknown}{_suggestions(unknown, known)}; allowed: "
            "'rounds', " + ", ".join(repr(k) for k in (*_OVER_RUN, *allowed))
        )
    try:
        fit_options = check_options(what, fit_options, FEDERATED_SVI)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    if rounds is not None and (
        isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0
    ):
        raise ModelFileError(f"{path}: {what}['rounds'] must be an integer >= 0")
    return fit_options, rounds, over_run


def _suggestions(unknown, known) -> str:
    """`` (did you mean 'rounds'?)`` for the unknown keys that resemble a known one."""
    pairs = [(key, closest(key, known)) for key in unknown]
    pairs = [(key, guess) for key, guess in pairs if guess]
    if not pairs:
        return ""
    if len(unknown) == 1:
        return f" (did you mean {pairs[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{g!r} for {k!r}" for k, g in pairs) + "?)"


def _family_options(path: Path, guide: str) -> Dict[str, Any]:
    """The :class:`~hbfl_pyro.FederatedSVI` keywords of the guide family named ``guide``."""
    from .guides import GuideError, guide_family

    try:
        return guide_family(guide)
    except GuideError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc


def _guide_options(path: Path, module: ModuleType) -> Mapping:
    """The file's ``guide_options`` (``{}`` if it has none), checked to be a mapping."""
    from .guides import GUIDE_FAMILIES

    by_guide = getattr(module, "guide_options", None) or {}
    if not isinstance(by_guide, Mapping):
        raise ModelFileError(
            f"{path}: guide_options must be a dict {{family: fit_options}}, "
            f"got {type(by_guide).__name__}"
        )
    unknown = sorted(str(family) for family in set(by_guide) - set(GUIDE_FAMILIES))
    if unknown:
        raise ModelFileError(
            f"{path}: guide_options names unknown guide famil{'y' if len(unknown) == 1 else 'ies'}"
            f" {unknown}{_suggestions(unknown, GUIDE_FAMILIES)}; known: "
            + ", ".join(repr(f) for f in GUIDE_FAMILIES)
        )
    return by_guide


def _svi_keywords() -> Tuple[str, ...]:
    from .svi import FederatedSVI

    params = inspect.signature(FederatedSVI.__init__).parameters
    return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def load_model_file(
    spec: Union[str, os.PathLike], attribute: Optional[str] = None, guide: Optional[str] = None
) -> ModelFile:
    """Import a model file and check it follows the protocol (module docstring).

    :param spec: the file's path, optionally with a ``:NAME`` suffix choosing the model.
    :param attribute: the model's name in the file; overrides a suffix of ``spec``.
    :param guide: a guide family's name (:func:`~hbfl_pyro.guides.build.guide_family`): its
        guides replace the file's, and the file's ``guide_options[guide]`` (if any) its
        ``fit_options``.
    :returns: a :class:`ModelFile`.
    :raises ModelFileError: if the file is missing, or lacks the model or ``load_data``,
        or its optional attributes have the wrong type; the message says what to add.
        Exceptions raised by the file's own code while it is imported propagate unchanged.

    Example::

        >>> mf = load_model_file("models/eight_schools.py:centered", guide="mean-field")
        >>> mf.model.__name__, sorted(mf.load_data())[:2], mf.rounds
        ('centered', ['A', 'B'], 300)
        >>> load_model_file("models/surgical.py", guide="structured").rounds
        1500
    """
    path, name = parse_model_spec(spec)
    name = attribute or name
    if not path.exists():
        raise ModelFileError(f"model file {str(path)!r} not found")
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} is not a file")
    module = _import_file(path.resolve())

    model = getattr(module, name, None)
    if model is None:
        found = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and n != "load_data"
        )
        hint = f" (functions defined there: {', '.join(found)})" if found else ""
        raise ModelFileError(
            f"{path} defines no {name!r}: add a Pyro model `def {name}(data): ...` with a "
            f'`pyro.plate("clients", ...)`, or choose one with {path}:NAME{hint}'
        )
    if not callable(model):
        raise ModelFileError(
            f"{path}: {name!r} is a {type(model).__name__}, not a callable Pyro model"
        )
    load_data = getattr(module, "load_data", None)
    if load_data is None or not callable(load_data):
        raise ModelFileError(
            f"{path} defines no `load_data()`: add `def load_data(): return "
            "{client_name: {key: array}}` returning each client's data"
        )

    options: Dict[str, Any] = {
        key: getattr(module, key) for key in SVI_ATTRIBUTES if hasattr(module, key)
    }
    if "per_client" in options:
        per_client = options["per_client"]
        if isinstance(per_client, str) or not all(isinstance(k, str) for k in per_client):
            raise ModelFileError(
                f"{path}: per_client must be a tuple of data keys, e.g. "
                f'per_client = ("x",), got {per_client!r}'
            )
        options["per_client"] = tuple(per_client)
    fit_options, rounds, over_run = _checked_fit_options(
        path, getattr(module, "fit_options", None), "fit_options"
    )
    options.update(fit_options)
    # Every family's settings are checked, whichever is chosen: a misspelled key under a
    # family not run today is still a mistake.
    by_guide = _guide_options(path, module)
    for family, raw in by_guide.items():
        _checked_fit_options(path, raw, f"guide_options[{family!r}]", rounds)
    if guide is not None:
        options.update(_family_options(path, guide))
        extra, extra_rounds, extra_over_run = _checked_fit_options(
            path, by_guide.get(guide), f"guide_options[{guide!r}]", rounds
        )
        # The family's settings replace the file's: a decay given per round there drops
        # the file's decay over the run, and the other way round.
        for target in set(extra) | set(extra_over_run):
            over_run.pop(target, None)
            options.pop(target, None)
        options.update(extra)
        over_run.update(extra_over_run)
        rounds = extra_rounds if extra_rounds is not None else rounds
    model_file = ModelFile(path, name, module, model, load_data, options, rounds, over_run, guide)
    if over_run:
        model_file.options = model_file.options_for(rounds)
    return model_file
