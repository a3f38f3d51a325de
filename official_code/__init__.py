"""The authors' code, run beside ours: import it from a clone, give it our weights, compare.

Nothing of the official repositories is in this project.  A user clones them into one folder,
each as ``owner+repo`` (``facebookresearch+ToMe``, ``youweiliang+evit``, ...; README,
"Checking against the official code"), and points ``bench.py --official DIR`` or
``TOKENBENCH_OFFICIAL_DIR`` (``tests/official/``) at it.  The clones are never edited: what a
newer timm or torch broke is mended from outside, while the import runs (:func:`importing_from`).

This package lives outside ``tokenbench/`` on purpose: it names methods and reads models'
insides, which the harness never does.  :data:`BUILDERS` holds the official models
``bench.py --official`` times (ToMe, EViT, DynamicViT); ``tests/official/`` checks every
method with official code, some through these builders and others inline.
"""

from __future__ import annotations

import collections.abc
import contextlib
import importlib
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

ENV = "TOKENBENCH_OFFICIAL_DIR"


@dataclass(frozen=True)
class Official:
    """One official implementation: the clone's folder name, its URL, and how to build it."""

    repo: str                     # owner+repo, the clone's folder name
    build: Callable               # build(dense, ours, clone: Path, **params) -> the official model, our weights
    label: str                    # how tables name it
    # How the official model computes attention: all three write softmax(q k^T) v out in their own
    # Attention class, whatever timm's fused-attention switch says (ours follows the switch).
    attention: str = "explicit"

    @property
    def url(self) -> str:
        return "https://github.com/" + self.repo.replace("+", "/", 1)

    def clone_in(self, root) -> Optional[Path]:
        """The clone under ``root``, or None where it is missing."""
        path = Path(root) / self.repo
        return path if path.is_dir() else None

    def missing_line(self, root) -> str:
        return (f"official {self.label}: no clone at {Path(root) / self.repo} "
                f"(git clone {self.url} {Path(root) / self.repo})")


def official_dir() -> Optional[Path]:
    """The folder of clones named by ``TOKENBENCH_OFFICIAL_DIR``, or None."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _timm_registry_snapshot() -> dict:
    """timm's model registry: official files register models under timm's own names
    (``deit_small_patch16_224``), which would replace timm's for the rest of the process."""
    from timm.models import _registry

    saved = {}
    for name, value in vars(_registry).items():
        if name.startswith("_") and not name.startswith("__") and isinstance(value, (dict, set, list)):
            saved[name] = (value, {k: (set(v) if isinstance(v, set) else v) for k, v in value.items()}
                           if isinstance(value, dict) else type(value)(value))
    return saved


def _timm_registry_restore(saved: dict) -> None:
    for obj, copy in saved.values():
        obj.clear()
        obj.update(copy) if isinstance(obj, (dict, set)) else obj.extend(copy)


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


# Modules some official files import for training or logging only; absent or removed from newer
# torch.  A stub stands in while the import runs, only where the real module is missing.
STUBS = {
    "torch._six": lambda: _stub("torch._six", inf=float("inf"), string_classes=(str, bytes),
                                container_abcs=collections.abc, int_classes=int),
    "tensorboardX": lambda: _stub("tensorboardX", SummaryWriter=object),
    "torchprofile": lambda: _stub("torchprofile", profile_macs=None),
    "wandb": lambda: _stub("wandb"),
}


@contextlib.contextmanager
def importing_from(clone: Path, subdir: str = "") -> Iterator[Path]:
    """Import from ``clone`` (``clone/subdir`` first on ``sys.path``) and leave no trace.

    Official repositories have top-level modules with common names (``models``, ``utils``,
    ``merge``): each import starts clean of any other clone's, and on exit the clone's modules
    are forgotten (objects already built keep working), the path and timm's registry restored.
    """
    root = (Path(clone) / subdir).resolve()
    before = set(sys.modules)
    saved_path = list(sys.path)
    registry = _timm_registry_snapshot()
    stubbed = []
    for name, make in STUBS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = make()
            stubbed.append(name)
    clashes = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_top_level_clash(n, root)}
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield root
    finally:
        sys.path[:] = saved_path
        home = str(Path(clone).resolve())
        for name in set(sys.modules) - before:
            if name in stubbed or _module_home(sys.modules.get(name)).startswith(home):
                sys.modules.pop(name, None)
        sys.modules.update(clashes)
        _timm_registry_restore(registry)


def import_bare(root: Path, dotted: str, top: Optional[str] = None):
    """Import ``dotted`` from ``root`` without running its parent packages' ``__init__`` files
    (which, in some official repositories, import every integration: LAVIS, transformers ...).
    ``top``: the folder of ``dotted``'s first part, where it differs (a vendored ``timm`` loaded
    under another name, beside the installed one).  Use inside :func:`importing_from`."""
    parts = dotted.split(".")
    folders = [top or parts[0]] + parts[1:]
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(Path(root).joinpath(*folders[:i]))]
            pkg.__file__ = str(Path(root).joinpath(*folders[:i], "__init__.py"))
            sys.modules[name] = pkg
    return importlib.import_module(dotted)


def _module_home(mod) -> str:
    """Where a module was loaded from (a namespace package: its first folder), or ''."""
    path = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", None) or []), "")
    return str(Path(path).resolve()) if path else ""


def _is_top_level_clash(name: str, root: Path) -> bool:
    """A loaded module (not torch, timm, numpy ...) whose name a file or folder of ``root`` also has."""
    top = name.split(".")[0]
    return (root / f"{top}.py").exists() or (root / top / "__init__.py").exists() or \
        ((root / top).is_dir() and top not in ("torch", "timm", "numpy"))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def load_same_weights(official: torch.nn.Module, state: dict, rename: Optional[Callable[[str], str]] = None,
                      own: Optional[Callable[[str], bool]] = None) -> None:
    """Load ``state`` (our model's state dict) into ``official``; every official parameter and
    buffer must come from ``state`` (a missing one would leave the official at its random init),
    except the constant buffers ``own`` names (the official's own, e.g. a mask it builds)."""
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    want = official.state_dict()
    if own is not None:
        state = {**{k: v for k, v in want.items() if own(k)}, **state}
    missing = [k for k in want if k not in state]
    if missing:
        raise KeyError(f"our state dict lacks the official keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    bad = [k for k in want if tuple(want[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"shapes differ for {bad[:5]}")
    official.load_state_dict({k: state[k] for k in want}, strict=True)


def _builders() -> dict[str, Official]:
    from . import dynamicvit, evit, tome

    return {"tome": Official("facebookresearch+ToMe", tome.build, "ToMe"),
            "evit": Official("youweiliang+evit", evit.build, "EViT"),
            "dynamicvit": Official("raoyongming+DynamicViT", dynamicvit.build, "DynamicViT")}


BUILDERS: dict[str, Official] = _builders()
