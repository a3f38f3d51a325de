"""``tokenbench analyze``: what reduction methods keep and how their errors relate, one job per module.

- :mod:`.settings`: the sweep's settings compared (one per accuracy record on the dense model's images);
- :mod:`.trace`: re-running a setting with the surgery's bookkeeping on (cached);
- :mod:`.metrics`: the analyses as pure functions on arrays (IoU, kappa, CKA, budgets, keep maps);
- :mod:`.tables`: the tables computed from them, written through :mod:`tokenbench.report.render`;
- :mod:`.plots`: their figures;
- :mod:`.analyze`: the command, from a results directory to tables, figures and ``index.md``.
"""
