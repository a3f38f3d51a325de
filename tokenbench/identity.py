"""What a record's key says about the code, the rules and the data that made its number.

Three things besides the model, method, parameters and settings determine a result:

- **the method's code**: the version the method declares (``Method.version``, raised by its
  author when its results change on purpose, as lm-evaluation-harness versions tasks) and
  a hash of the code it runs (comments and docstrings left out): its own file, the method files
  it imports (a merging method reusing ToMe's matching), the shared surgery every method goes through (the files of
  ``tokenbench/backbones/`` that are not a model family's: ``base.py``, ``tokens.py``,
  ``__init__.py``) and the backbone file of each model family the method declares
  (``Method.backbones``: a ViT-only method is not made stale by an edit to ``swin.py``);
- **the protocol** of each measurement kind (:data:`PROTOCOLS`), raised here whenever the
  counting, timing or evaluation rules change;
- **the data** of an accuracy figure: a fingerprint of the files (checksums of the
  Fashion-MNIST files; the class list plus the sorted relative paths and sizes of an image
  folder).

A record whose code or protocol differs from what this checkout would write is *stale*
(:func:`stale_reasons`): ``tokenbench run`` measures it again (its key no longer matches)
and ``tokenbench report`` marks it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .registry import Method

# The rules of each measurement kind.  Raise a number whenever its rules change (and say
# what changed below): every record measured under the old rules becomes stale.
PROTOCOLS: dict[str, int] = {
    "flops": 1,       # fvcore MACs, fused attention counted, eval mode, mean over the counted images
    "throughput": 1,  # torch.utils.benchmark blocks, threads = CPUs this process may use, per-measurement peak memory
    # (aten_ops and host_ms, tokenbench.measure.overhead, were added beside the timing without raising it: the
    # timed number's rules are unchanged, and a record without them shows them as missing)
    "speedup": 1,     # method and dense timed interleaved in rounds on one input; ratio median and quartiles
    "accuracy": 1,    # top-1/top-5, Wilson interval, per-image correctness; random's choice keyed by image index
    "segmentation": 1,  # mIoU from one confusion matrix over the set, pixel accuracy, bootstrap intervals over images
}

SURGERY = Path(__file__).resolve().parent / "backbones"  # the shared machinery every method runs through
METHODS_PACKAGE = "tokenbench.methods"  # the one import name of the built-in method files

_HASHES: dict[tuple, str] = {}
# CPython 3.11's parser is not safe to enter from two threads at once ("AST constructor recursion
# depth mismatch"): two runners sweeping one folder in threads of one process hash their methods
# together, so every parse here takes this lock.
_PARSING = threading.Lock()


def _file_stamp(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without the docstrings of its module, classes and functions."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_text(path: Path) -> str:
    """The code of a Python file without its comments, docstrings and layout: the docstring-free
    syntax tree written back as source (``ast.unparse``, steadier across Python versions than
    ``ast.dump``, whose node fields grow).  A file that does not parse counts by its text."""
    text = path.read_text(encoding="utf-8")
    try:
        with _PARSING:
            return ast.unparse(_strip_docstrings(ast.parse(text)))
    except SyntaxError:
        return text


def _method_imports(path: Path) -> list[Path]:
    """The method files ``path`` imports (``tokenbench.methods.X``, or ``.X`` beside it)."""
    try:
        source = path.read_text(encoding="utf-8")
        with _PARSING:
            tree = ast.parse(source)
    except (OSError, SyntaxError):
        return []
    here = path.resolve().parent
    pkg = METHODS_PACKAGE + "."
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name[len(pkg):] for a in node.names if a.name.startswith(pkg)]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == METHODS_PACKAGE:  # from . import x / from tokenbench.methods import x
                names += [mod] if node.level and mod else [a.name for a in node.names]
            elif mod.startswith(pkg):
                names.append(mod[len(pkg):])
    out = []
    for n in names:
        f = here / (n.split(".")[0] + ".py")
        if f.is_file() and f.resolve() != path.resolve() and f.resolve() not in out:
            out.append(f.resolve())
    return out


def _backbone_files(cls: type[Method]) -> list[Path]:
    """The surgery files ``cls`` runs through: the shared ones and those of its declared families."""
    from .backbones.base import _BACKBONES

    families = {}
    for b in _BACKBONES:
        try:
            families[Path(inspect.getsourcefile(b)).resolve()] = b.name
        except TypeError:
            pass
    declared = set(cls.backbones)
    return [f for f in sorted(SURGERY.glob("*.py"))
            if f.resolve() not in families or families[f.resolve()] in declared]


def _own_file(cls: type[Method]) -> Optional[Path]:
    """The file that defines ``cls`` (None for a class made at run time)."""
    try:
        return Path(inspect.getsourcefile(cls)).resolve()
    except TypeError:
        return None


def source_files(cls: type[Method]) -> list[Path]:
    """The files whose code determines what ``cls`` computes: its own module, the method modules
    it imports (and those they import), and the surgery it runs through (:func:`_backbone_files`)."""
    files: list[Path] = []
    own = _own_file(cls)
    todo = [] if own is None else [own]
    while todo:
        f = todo.pop(0)
        if f not in files:
            files.append(f)
            todo += _method_imports(f)
    for f in _backbone_files(cls):
        if f.resolve() not in files:
            files.append(f.resolve())
    return files


def source_hash(cls: type[Method]) -> str:
    """sha256 (16 hex digits) over the names and code (:func:`code_text`) of :func:`source_files`:
    an edit to a comment or a docstring leaves it as it was."""
    files = source_files(cls)
    stamp = tuple(_file_stamp(p) for p in files)
    if stamp not in _HASHES:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0" + code_text(p).encode() + b"\0")
        _HASHES[stamp] = h.hexdigest()[:16]
    return _HASHES[stamp]


def method_code(cls: type[Method]) -> dict[str, str]:
    """The code identity of a registered method class, as it enters a record key."""
    return {"version": str(cls.version), "source": source_hash(cls)}


# --------------------------------------------------------------------------- data

def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        stamp = _file_stamp(p)
        if stamp not in _HASHES:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    fh.update(chunk)
            _HASHES[stamp] = fh.hexdigest()
        h.update(p.name.encode() + b"\0" + _HASHES[stamp].encode() + b"\0")
    return h.hexdigest()[:16]


def folder_root(data_dir: str | os.PathLike, split: str) -> Path:
    """The folder an image-folder split is read from: ``DIR/<split>/`` when it exists, else ``DIR``."""
    root = Path(data_dir)
    return root / split if (root / split).is_dir() else root


CONTENT_SAMPLE = 256  # files whose bytes enter a folder's fingerprint (all of them in a small folder)


def folder_fingerprint(root: Path) -> str:
    """Class list, every file's relative path and size, and the bytes of up to
    :data:`CONTENT_SAMPLE` files spread evenly over the sorted list: cheap on ImageNet's
    50,000 validation images, exact on small folders.  Added, removed, renamed or resized
    images always change it; where the same-size files differ only in content, the sample
    catches it in a small folder and probably in a large one."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [Path(dirpath) / fn for fn in sorted(filenames)]
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return files_fingerprint(root, files, "\n".join(classes))


def files_fingerprint(root: Path, files: list[Path], header: str = "") -> str:
    """``header``, each of ``files``' path relative to ``root`` and size, and the bytes of up to
    :data:`CONTENT_SAMPLE` of them spread evenly over the list (the rule of
    :func:`folder_fingerprint`, for datasets that list their files)."""
    entries: list[tuple[str, Path, int]] = []
    for p in files:
        try:
            entries.append((str(p.relative_to(root)), p, p.stat().st_size))
        except OSError:
            continue
    h = hashlib.sha256((header + "\0").encode())
    for rel, _, size in entries:
        h.update(f"{rel}\t{size}\n".encode())
    step = max(1, len(entries) // CONTENT_SAMPLE)
    for _, p, _ in entries[::step][:CONTENT_SAMPLE]:
        try:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        except OSError:
            pass
    return h.hexdigest()[:16]


def data_fingerprint(name: str, split: str, data_dir: Optional[str] = None) -> str:
    """The identity of the images an accuracy figure is computed on (not where they live)."""
    if name == "fashion-mnist":
        from .data import find_fashion_mnist

        d = find_fashion_mnist(data_dir)
        prefix = "t10k" if split == "test" else "train"
        files = sorted(p for p in d.iterdir() if p.name.startswith(prefix + "-"))
        if split == "test":
            return "fmnist:" + _hash_files(files)
        # val and train are carved from the train files (data.FMNIST_SPLIT_TEXT): the rule is part of the identity
        from .data import FMNIST_VAL_SEED, FMNIST_VAL_SIZE

        return f"fmnist-{split}-held{FMNIST_VAL_SIZE}s{FMNIST_VAL_SEED}:" + _hash_files(files)
    if name == "synthetic":
        return "synthetic:v1"
    if data_dir is None:
        return f"{name}:no-dir"
    root = folder_root(data_dir, split)
    if not root.is_dir():
        return f"{name}:missing"
    return f"{name}:" + folder_fingerprint(root)


# --------------------------------------------------------------------------- staleness

def stale_reasons(rec: dict) -> list[str]:
    """Why ``rec`` would not be written the same by this checkout (empty when it is current)."""
    from .errors import UserError
    from .registry import get_method

    kind = rec.get("kind")
    kf = rec.get("key_fields") or {}
    out: list[str] = []
    if "protocol" not in kf or "code" not in kf:
        return ["measured before records carried their code and protocol"]
    if kind in PROTOCOLS and kf["protocol"] != PROTOCOLS[kind]:
        out.append(f"{kind} protocol {kf['protocol']} (now {PROTOCOLS[kind]})")
    method = kf.get("method")
    try:
        now = method_code(get_method(method))
    except UserError:
        return out + [f"method {method!r} is no longer registered"]
    was = kf["code"] or {}
    if was.get("version") != now["version"]:
        out.append(f"{method} version {was.get('version')} (now {now['version']})")
    elif was.get("source") != now["source"]:
        out.append(f"{method}'s code changed")
    base = kf.get("baseline_code")
    if base is not None and kind == "speedup":
        dense_now = method_code(get_method("none"))
        if base != dense_now:
            out.append("the dense baseline's code changed")
    return out


def describe_key() -> dict[str, Any]:
    """What the protocol page (docs/protocol.md) says a key contains (for `tokenbench list --json`)."""
    return {"protocols": dict(PROTOCOLS)}
