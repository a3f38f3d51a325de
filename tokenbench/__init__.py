"""tokenbench: one harness to measure token reduction in vision transformers.

    import tokenbench
    model, info = tokenbench.load("deit_small_patch16_224", method="tome", params={"r": 13})
    tokenbench.flops(model)          # GFLOPs, tokens per block
    tokenbench.throughput(model)     # images/s (median, quartiles), batch-1 latency
    tokenbench.evaluate(model, "fashion-mnist")

Methods are applied with ``tokenbench.apply(model, "tome", r=13)``.
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: F401
from .registry import Method, Param, apply, get_method, list_methods, register  # noqa: F401


def __getattr__(name):  # lazy: keep `import tokenbench` cheap
    if name in ("load", "flops", "throughput", "evaluate", "token_counts"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
