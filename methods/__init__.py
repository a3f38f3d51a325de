"""The built-in methods, one file each, imported as ``tokenbench.methods.<file>``.

This folder is the package ``tokenbench.methods`` in every layout: an installed copy (the
``package-dir`` mapping in ``pyproject.toml``) and a checkout (the link ``tokenbench/methods``).
A method reuses another's pure functions by that name, for example
``from tokenbench.methods.tome import bipartite_soft_matching``.  Files whose name starts with
an underscore are not methods (the registry imports every other file here).
"""
