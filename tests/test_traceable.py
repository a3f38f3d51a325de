"""Methods with a fixed token schedule trace with ``torch.jit.trace``: the traced model gives the
model's logits on another batch."""

import pytest

from conftest import VIT_TINY, assert_traceable, peaked_vit
from tokenbench import registry


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("method,params", [("tome", {"r": 3}), ("evit", {"keep_rate": 0.5})])
def test_the_traced_model_gives_the_models_logits(method, params):
    model = peaked_vit("cls", VIT_TINY)
    registry.apply(model, method, **params)
    assert_traceable(model)
