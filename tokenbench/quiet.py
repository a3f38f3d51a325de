"""Silence two notices that third-party imports print into a user's output, and nothing else.

- fvcore imports ``torch.jit.script`` (deprecated in recent torch) and traces with
  ``torch.jit.trace``: a ``FutureWarning`` per process that says nothing about the user's model.
- ``torch.utils.benchmark`` imports ``torch.utils.cpp_extension``, which logs "No CUDA runtime is
  found" on machines without one, although no extension is ever built.

Both are scoped: warnings and log levels are restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def torch_jit_deprecations():
    """Hide torch's deprecation of ``torch.jit.*`` (fvcore's import and trace) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=DeprecationWarning)
        yield


@contextlib.contextmanager
def cuda_runtime_notice():
    """Hide ``torch.utils.cpp_extension``'s "No CUDA runtime is found" log inside the block."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)
