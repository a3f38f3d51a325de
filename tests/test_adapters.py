"""The shared adapter suite: every registered method (built-in or plugin) goes through the same
checks (:mod:`tokenbench.adapter_checks`, which `tokenbench check METHOD` also runs), so a new
method gets them for free.

Shapes, the declared token schedule against what the model does, batch consistency (an
image's logits do not depend on the batch it is in), determinism (and seeds), refused bad
parameters, a clean restore, fewer FLOPs where the method says it reduces, and a training
step for learned methods (the full map of a dense task: ``tests/test_grid_restore.py``).
"""

from __future__ import annotations

import pytest

from tokenbench import adapter_checks as checks
from tokenbench.registry import _SOURCES, get_method, load_methods


def _shipped() -> list[str]:
    """Built-in methods and installed plugins (not the toy methods other tests register)."""
    load_methods()
    return sorted(n for n, src in _SOURCES.items() if src)


METHODS = _shipped()


@pytest.mark.parametrize("name", METHODS)
def test_declaration_is_complete(name):
    checks.declaration(name)


@pytest.mark.parametrize("name", METHODS)
def test_shapes_schedule_and_batch_consistency(name):
    checks.shapes_schedule_and_batch(name)


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_and_seeded(name):
    checks.deterministic_and_seeded(name)


@pytest.mark.parametrize("name", METHODS)
def test_bad_parameters_are_refused(name):
    checks.bad_parameters_refused(name)


@pytest.mark.parametrize("name", METHODS)
def test_restore_gives_the_plain_model(name):
    checks.restore_gives_the_plain_model(name)


@pytest.mark.parametrize("name", METHODS)
def test_reducing_settings_count_fewer_flops(name):
    checks.fewer_flops_where_it_reduces(name)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).learned])
def test_training_step_reaches_the_learned_parts(name):
    checks.training_step_reaches_learned_parts(name)

