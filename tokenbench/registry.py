"""The method registry: declarations, discovery, parsing and validation of parameters.

A method is a subclass of :class:`Method` decorated with :func:`register`, in a file of
its own under ``methods/`` (found automatically) or in a third-party package that
exposes it through the entry-point group ``tokenbench.methods``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import traceback
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn

from .errors import UserError, did_you_mean

ENTRY_POINT_GROUP = "tokenbench.methods"
FAMILIES = ("none", "pruning", "merging", "hybrid", "baseline")

# The training loss a method's ``train_setup`` returns: ``loss_fn(model, x, y)`` with a batch of
# images ``x`` and labels ``y`` returns ``(loss, logits, metrics)``: the scalar to minimise, the
# model's logits (for the training accuracy) and a dict of floats logged per step.  An optional
# attribute ``loss_fn.metric_names`` (a tuple of str) names the metrics' columns in the log.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, float]]]


@dataclass
class DenseOutputs:
    """One training forward of a dense model with a method applied to its encoder, for a method's
    :data:`DenseLossFn`: the per-pixel ``logits`` [B, K, H, W], the encoder's feature ``maps`` (the
    full grid the decoder read), the per-pixel cross-entropy ``pixel_loss``, and ``teacher()``:
    the frozen dense teacher's (logits, maps) on the same images, computed on first call."""

    logits: torch.Tensor
    maps: list
    pixel_loss: torch.Tensor
    teacher: Callable[[], tuple]


# The training loss a method's ``dense_train_setup`` returns: ``loss_fn(encoder, out)`` with ``out``
# a :class:`DenseOutputs` returns ``(loss, metrics)``: the whole scalar to minimise (the pixel loss
# weighted as the method weighs its task loss) and floats logged per step; ``metric_names`` as for
# :data:`LossFn`.
DenseLossFn = Callable[[nn.Module, "DenseOutputs"], tuple[torch.Tensor, dict[str, float]]]
# (tokens entering each block, tokens entering each block's MLP)
TokenSchedule = tuple[list[int], list[int]]


class GridRestore(str, Enum):
    """How a reduced model hands back the full feature map a dense task reads (timm's
    ``forward_intermediates`` and ``features_only``), at every stage, on the original grid."""

    KEEPS = "keeps"                # the map never loses a position (the dense model; slow and fast paths)
    FILL = "fill"                  # a pruned position holds the value its token had when it was dropped
    UNMERGE = "unmerge"            # every position receives the token its group was merged into
    FILL_UNMERGE = "fill+unmerge"  # both: pruned positions filled back, merged ones unmerged
    NONE = "none"                  # cannot: refused for dense tasks


GRID_RESTORE_TEXT = {
    GridRestore.KEEPS: "keeps the full map by construction",
    GridRestore.FILL: "fills each pruned position back with the value its token had when it was dropped",
    GridRestore.UNMERGE: "unmerges: every position receives the token its group was merged into",
    GridRestore.FILL_UNMERGE: "fills pruned positions back with their value when dropped and unmerges merged ones "
                              "(each receives its group's token)",
    GridRestore.NONE: "cannot hand back the full map: refused for dense tasks",
}


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default, valid range and a line of help.

    ``type`` is one of ``float``, ``int``, ``bool``, ``str``, ``int_or_list`` (an int,
    or a list of non-negative ints, one per block).
    """

    name: str
    type: str
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    min_exclusive: bool = False
    choices: Optional[Sequence[Any]] = None
    # The value at which the parameter removes no token (a keep rate of 1, a merge count of 0; for
    # a list, every entry): the default ``Method.reduces`` compares the knob with it.
    identity: Any = None

    def range_text(self) -> str:
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        if self.min is None and self.max is None:
            return ""
        return ("(" if self.min_exclusive else "[") + f"{lo}, {hi}]"

    def _check_num(self, v: float, method: str) -> None:
        bad = (self.min is not None and (v < self.min or (self.min_exclusive and v == self.min))) or \
              (self.max is not None and v > self.max)
        if bad:
            raise UserError(f"{method}: {self.name}={v} is out of range {self.range_text()} ({self.help})")

    def parse(self, value: Any, method: str) -> Any:
        """``value`` (already JSON-decoded where possible) converted and validated."""
        t = self.type
        try:
            if t == "bool":
                if isinstance(value, bool):
                    out: Any = value
                elif isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                    out = value.lower() in ("true", "1", "yes")
                elif isinstance(value, int) and value in (0, 1):
                    out = bool(value)
                else:
                    raise ValueError
            elif t == "float":
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if out != out or out in (float("inf"), float("-inf")):
                    raise ValueError
                self._check_num(out, method)
            elif t == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
                self._check_num(out, method)
            elif t == "int_or_list":
                if isinstance(value, (list, tuple)):
                    out = []
                    for v in value:
                        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                            raise ValueError
                        out.append(int(v))
                        self._check_num(int(v), method)
                else:
                    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                        raise ValueError
                    out = int(value)
                    self._check_num(out, method)
            elif t == "str":
                out = str(value)
            else:  # pragma: no cover - declaration error
                raise TypeError(f"unknown parameter type {t}")
        except (ValueError, TypeError):
            want = {"int_or_list": "an integer or a list of integers"}.get(t, f"a {t}")
            raise UserError(f"{method}: {self.name} must be {want}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise UserError(f"{method}: {self.name}={out!r} is not one of {list(self.choices)}")
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "default": self.default, "range": self.range_text(),
                "help": self.help}


class Method:
    """Base class of a token-reduction adapter: the whole contract between a method and the harness.

    The harness reads only this declaration and calls only these hooks.

    Declaration (class attributes): ``name``, ``version``, ``summary``; ``params`` (:class:`Param`
    tuple: the CLI lists and validates them); ``family``; ``learned``; ``knob``; ``seed_param``;
    ``deterministic``; ``seed_breaks_ties``; ``needs_class_token``; ``backbones``; ``restores_grid``;
    ``train_params``, ``train_defaults``; ``compile_note``; ``paper``, ``code``, ``code_url``, ``licence``, ``verified``.
    Each is described where it is declared below.

    Hooks: :meth:`apply` (required), :meth:`expected_tokens`, :meth:`reduces`,
    :meth:`convert_checkpoint`, and for training :meth:`train_setup`, :meth:`param_groups`,
    :meth:`train_step`.
    """

    name: ClassVar[str] = ""
    # Raise when the method's results change on purpose (a fixed bug, a new default): every
    # record it wrote becomes stale.  Edits to its code change its records' keys anyway.
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    # Has trainable parts of its own (a checkpoint says whether they were trained).
    learned: ClassVar[bool] = False
    # Needs a class token: True on every family it applies to, or the families where it does (a
    # tuple of names); the harness refuses, in one line and before :meth:`apply`, a model without one.
    needs_class_token: ClassVar[Union[bool, tuple[str, ...]]] = False
    # Gives the same output for the same input (random choices are keyed by ``seed_param``).
    deterministic: ClassVar[bool] = True
    # What kind of reduction: "pruning" (tokens dropped), "merging" (tokens combined), "hybrid"
    # (both), "baseline" (a reference a token method must beat: a lower resolution, plain pooling),
    # or "none" (the dense model).  Tables and plots group and mark methods by it.
    family: ClassVar[str] = "pruning"
    # The budget knob: the parameter a matched-FLOPs search moves (``keep_rate``, ``r``); None if
    # the method has none.  Its :attr:`Param.identity` is the setting that reduces nothing.
    knob: ClassVar[Optional[str]] = None
    # The parameter that seeds a non-deterministic method's choices (sweeps expand it over
    # ``--seeds``; tables average over it); None for deterministic methods.
    seed_param: ClassVar[Optional[str]] = None
    # The seed only draws tie-breaking noise (a result changes only where two scores tie at the
    # noise's scale): a sweep measures such a method at its first seed alone, and says so.
    seed_breaks_ties: ClassVar[bool] = False
    # Backbone families the method applies to (see ``tokenbench.backbones``).
    backbones: ClassVar[tuple[str, ...]] = ("vit",)
    # How the reduced model hands back the full feature map of a dense task (:class:`GridRestore`),
    # or a dict from backbone family to it where the families differ; a family not named, and a
    # method that declares nothing, cannot (refused for dense tasks in one line).  The backbone
    # layer does the restoring from what ``TokenState``'s primitives did; this says which it is.
    restores_grid: ClassVar[Union[GridRestore, dict[str, GridRestore]]] = GridRestore.NONE
    # Training-only parameters (e.g. EViT's keep-rate warm-up): accepted by `tokenbench train
    # --set`, recorded in the run's config.json, passed to ``train_step``; never part of the
    # applied model's spec (inference does not depend on them).
    train_params: ClassVar[tuple[Param, ...]] = ()
    # Training defaults per model name, where the method's general recipe does not suit a model:
    # {"default": {"set": {...training-only or model parameters...}, "loss_weights": {...},
    #              "recipe": {...TrainConfig fields: lr, epochs, grad_clip...}, "why": "one line"}}.
    # `tokenbench train` starts from them and says so; the user's flags override each value.
    train_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # How the method compiles under ``torch.compile`` (recorded with compiled timings).  A method
    # whose token counts vary per image says how it compiles instead (dynamic shapes, graph breaks).
    compile_note: ClassVar[str] = "static token counts: fullgraph"
    # Where the method comes from, shown on its page of the documentation (None: the entry of
    # ``docs/method_provenance.toml``): the paper, the official code's name and address, the
    # original's licence, and how the adapter was checked against the official code.
    paper: ClassVar[Optional[str]] = None
    code: ClassVar[Optional[str]] = None
    code_url: ClassVar[Optional[str]] = None
    licence: ClassVar[Optional[str]] = None
    verified: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.family not in FAMILIES:
            raise ValueError(f"{cls.__name__}: family must be one of {FAMILIES}, not {cls.family!r}")
        declared = cls.restores_grid
        for how in (declared.values() if isinstance(declared, dict) else (declared,)):
            if not isinstance(how, GridRestore):
                raise ValueError(f"{cls.__name__}: restores_grid must be a GridRestore (or a dict of them by "
                                 f"backbone family), not {how!r}")

    def apply(self, model: nn.Module, **params: Any) -> nn.Module:
        """Install the method on ``model`` (in place) and return it: ``backbone_of(model).prepare(...)``
        gives the plan to put hooks on; sites come from ``backbone.sites("quarters" | "every" | ...)``.
        ``params`` are validated, with defaults filled in."""
        raise NotImplementedError

    def expected_tokens(self, model: nn.Module, **params: Any) -> Optional[TokenSchedule]:
        """(tokens entering each block, tokens entering each MLP) for the model's input size;
        None when the count depends on the image.  The shared tests check it against the model."""
        return None

    @classmethod
    def reduces(cls, params: dict[str, Any]) -> bool:
        """Whether these (validated) parameters remove any token; a FLOPs count that finds the
        dense token count everywhere then warns.  By default: the dense model never does; a method
        whose knob declares an :attr:`Param.identity` does unless the knob (every entry of a
        list) equals it; any other method does."""
        if cls.family == "none":
            return False
        if cls.knob is None:
            return True
        identity = cls.param(cls.knob).identity
        value = params[cls.knob]
        if identity is None:
            return True
        return any(v != identity for v in (value if isinstance(value, (list, tuple)) else [value]))

    def convert_checkpoint(self, model: nn.Module, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        """``state`` (a checkpoint's state dict, for ``--checkpoint``) in the layout of ``model``
        with this method applied, for methods whose official release files differ from it; None:
        not the method's to convert (the backbone's conversion of official weights applies)."""
        return None

    # ---- training hooks (learned methods, or methods fine-tuned with the backbone)
    def train_setup(self, model: nn.Module, teacher: Optional[nn.Module], params: Optional[dict[str, Any]] = None,
                    weights: Optional[dict[str, float]] = None) -> Optional[LossFn]:
        """The training loss (:data:`LossFn`) for ``model``, distilled from ``teacher`` where the
        method does; ``params`` its model and training-only parameters, ``weights`` the user's loss
        weights.  None: plain label-smoothed cross-entropy."""
        return None

    def dense_train_setup(self, encoder: nn.Module, params: Optional[dict[str, Any]] = None,
                          weights: Optional[dict[str, float]] = None) -> Optional[DenseLossFn]:
        """The training loss (:data:`DenseLossFn`) when a dense model trains with the method applied
        to its ``encoder``; None: the per-pixel cross-entropy alone.  A learned method whose
        :meth:`train_setup` adds losses and that has none here is refused for dense training."""
        return None

    def param_groups(self, model: nn.Module, weight_decay: float, **kw: Any) -> Optional[list[dict[str, Any]]]:
        """Optimizer parameter groups (e.g. a lower rate for the backbone); None: the default groups."""
        return None

    def train_step(self, model: nn.Module, params: dict[str, Any], epoch: float) -> None:
        """Called before every training step with the (fractional) epoch: schedules such as a
        keep-rate warm-up update the method's plan settings here."""

    # ---- helpers
    @classmethod
    def grid_restore(cls, family: str) -> GridRestore:
        """How the method restores the full grid on backbone ``family`` (``vit``, ``convnext``, ...)."""
        declared = cls.restores_grid
        return declared.get(family, GridRestore.NONE) if isinstance(declared, dict) else declared

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {p.name: p.default for p in cls.params}

    @classmethod
    def validate(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value converted and range-checked; unknown keys refused."""
        cls._refuse_unknown(params, [p.name for p in cls.params])
        out = {}
        for p in cls.params:
            out[p.name] = p.parse(params[p.name], cls.name) if p.name in params else p.default
        return out

    @classmethod
    def _refuse_unknown(cls, params: dict[str, Any], names: list[str]) -> None:
        for k in params:
            if k not in names:
                hint = (did_you_mean(k, names) or f" (its parameters: {', '.join(names)})") if names \
                    else " (it takes no parameters)"
                raise UserError(f"{cls.name}: unknown parameter {k!r}{hint}")

    @classmethod
    def validate_training(cls, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``params`` into (model parameters, training-only parameters), each validated
        with defaults filled in; a key that is neither is refused with suggestions."""
        tnames = [p.name for p in cls.train_params]
        cls._refuse_unknown(params, [p.name for p in cls.params] + tnames)
        model_p = cls.validate({k: v for k, v in params.items() if k not in tnames})
        train_p = {p.name: p.parse(params[p.name], cls.name) if p.name in params else p.default
                   for p in cls.train_params}
        return model_p, train_p

    @classmethod
    def describe(cls) -> dict[str, Any]:
        out: dict[str, Any] = {"name": cls.name, "version": cls.version, "summary": cls.summary, "learned": cls.learned,
               "family": cls.family, "knob": cls.knob, "seed_param": cls.seed_param,
               "seed_breaks_ties": cls.seed_breaks_ties,
               "backbones": list(cls.backbones),
               "needs_class_token": cls.needs_class_token, "deterministic": cls.deterministic,
               "restores_grid": ({f: h.value for f, h in cls.restores_grid.items()}
                                 if isinstance(cls.restores_grid, dict) else cls.restores_grid.value),
               "params": [p.describe() for p in cls.params]}
        if cls.train_params:
            out["train_params"] = [p.describe() for p in cls.train_params]
        return out


_REGISTRY: dict[str, type[Method]] = {}
_SOURCES: dict[str, str] = {}
_BROKEN: dict[str, str] = {}  # method files of methods/ that failed to import: why
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``cls.name``.  A name already taken by another
    class is refused (the same class defined again, as when its module is reloaded, replaces it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise UserError(f"method {cls.name!r} is registered twice: {old.__module__}.{old.__qualname__} "
                        f"and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def methods_dir() -> Path:
    """Where the built-in method files live: the package ``tokenbench.methods`` (``methods/``)."""
    spec = importlib.util.find_spec("tokenbench.methods")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _load_file(path: Path) -> None:
    """Import one method file of ``methods/`` as ``tokenbench.methods.<stem>``; one that fails to
    import (a syntax error, a missing package) is said in one warning line naming the file and the
    line, and left out: the other methods still run, and asking for it says why it is missing."""
    before = set(_REGISTRY)
    try:
        importlib.import_module(f"tokenbench.methods.{path.stem}")  # (perhaps already imported by another method)
    except Exception as e:
        for name in set(_REGISTRY) - before:  # what the file registered before it failed
            if _REGISTRY[name].__module__ == f"tokenbench.methods.{path.stem}":
                del _REGISTRY[name]
        _BROKEN[path.stem] = f"method file {_shown(path)} does not import: {_import_error(e, path)}"
        warnings.warn(f"tokenbench: {_BROKEN[path.stem]}; it is left out", stacklevel=2)
        return
    for name in set(_REGISTRY) - before:  # a method file importing another registers both here
        _SOURCES[name] = str(Path(inspect.getsourcefile(_REGISTRY[name]) or path).resolve())


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _import_error(e: Exception, path: Path) -> str:
    """``Type: message`` of an import failure, with the line of ``path`` it happened at."""
    if isinstance(e, SyntaxError):
        line, text = e.lineno, e.msg or ""
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line, text = (frames[-1].lineno if frames else None), (str(e).splitlines()[0] if str(e) else "")
    return f"{type(e).__name__}: {text}" + (f" (line {line})" if line else "")


def _load_plugin(ep: Any) -> None:
    """Register the methods of one entry point (its object, if a :class:`Method`, and whatever its
    module registers); a plugin that fails is reported in one warning line and left out."""
    before = set(_REGISTRY)
    try:
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method) and _REGISTRY.get(obj.name) is not obj:
            register(obj)
    except Exception as e:  # a broken plugin must not break the built-ins, nor go unnoticed
        warnings.warn(f"tokenbench: method plugin {ep.name!r} ({ep.value}) failed to load: "
                      f"{type(e).__name__}: {e}", stacklevel=2)
        return
    for name in set(_REGISTRY) - before:
        _SOURCES[name] = f"entry point {ep.name} ({ep.value})"


def load_methods() -> dict[str, type[Method]]:
    """Discover built-in methods and entry-point plugins (once)."""
    global _LOADED
    if _LOADED:
        return _REGISTRY
    _LOADED = True
    for path in sorted(methods_dir().glob("*.py")):
        if not path.name.startswith("_"):
            _load_file(path)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _load_plugin(ep)
    return _REGISTRY


def get_method(name: str) -> type[Method]:
    reg = load_methods()
    if name not in reg and name in _BROKEN:
        raise UserError(_BROKEN[name])
    if name not in reg:
        raise UserError(f"unknown method {name!r}{did_you_mean(name, reg)}; registered: {', '.join(sorted(reg))}")
    return reg[name]


def list_methods() -> list[dict[str, Any]]:
    reg = load_methods()
    return [reg[n].describe() | {"source": _SOURCES.get(n, "")} for n in sorted(reg, key=lambda n: (n != "none", n))]


# One element of a run-length encoded list, as tables print schedules: ``5x3`` is 5, 5, 5.
_RUN = re.compile(r"\s*(-?[0-9][0-9.eE+-]*)\s*x\s*([0-9]+)\s*")


def _parse_compact_list(v: str) -> Optional[list[Any]]:
    """``[5x3,4x9]`` (the tables' notation for schedules) to ``[5, 5, 5, 4, ...]``; None if it is not one."""
    v = v.strip()
    if not (v.startswith("[") and v.endswith("]")) or "x" not in v:
        return None
    out: list[Any] = []
    for part in v[1:-1].split(","):
        m = _RUN.fullmatch(part)
        try:
            value, count = (json.loads(m.group(1)), int(m.group(2))) if m else (json.loads(part), 1)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        out += [value] * count
    return out


def parse_value(v: str) -> Any:
    """One ``--set`` value: JSON where it parses, a compact schedule (``[5x3,4x9]``), else the string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        compact = _parse_compact_list(v)
        return v if compact is None else compact


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values as :func:`parse_value` reads them."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        out[k] = parse_value(v)
    return out


def apply(model: nn.Module, name: str = "none", **params: Any) -> nn.Module:
    """Apply method ``name`` with ``params`` to ``model`` (in place) and return it.  What the
    method declares is checked first: its backbone families, its need of a class token."""
    cls = get_method(name)
    p = cls.validate(params)
    from .backbones import backbone_of, surgery_of

    bb = backbone_of(model, name)
    if cls.backbones and bb.name not in cls.backbones:
        raise UserError(f"{name} does not apply to {bb.name} models (it supports: {', '.join(cls.backbones)})")
    need = cls.needs_class_token
    bb.check(name, need_class_token=need is True or (isinstance(need, tuple) and bb.name in need))
    m = cls()
    out = m.apply(model, **p)

    s = surgery_of(out)
    if s is not None:
        s.method = {"name": name, "params": p}
    return out
