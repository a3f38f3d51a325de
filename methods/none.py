"""`none`: the dense model, unchanged. The baseline every method is compared with."""

from tokenbench.registry import Method, register
from tokenbench import vit


@register
class NoReduction(Method):
    name = "none"
    family = "none"
    version = "1"
    summary = "The dense model (no token reduction)."
    params = ()

    def apply(self, model, **params):
        # Through the shared surgery, so that token counts are recorded like every method's.
        vit.prepare(model, self.name)
        return model

    @classmethod
    def reduces(cls, params):
        return False

    def expected_tokens(self, model, **params):
        n = vit.num_patches(model) + model.num_prefix_tokens
        d = len(model.blocks)
        return [n] * d, [n] * d
