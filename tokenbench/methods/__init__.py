"""The built-in methods, importable under one public name: ``tokenbench.methods.<file>``.

The method files live in ``methods/`` at the top of the repository (one file per method,
nothing else in it); an installed copy ships them as ``tokenbench.builtin_methods``.  This
package points at whichever is present, so a method reuses another's pure functions with,
for example, ``from tokenbench.methods.tome import bipartite_soft_matching``.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
for _d in (_here.parent.parent / "methods", _here.parent / "builtin_methods"):
    if _d.is_dir() and any(_d.glob("*.py")):
        __path__.append(str(_d))  # noqa: F821  (the package's own __path__)
        break
