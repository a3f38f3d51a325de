"""`none`: the dense model, unchanged. The baseline every method is compared with."""

from tokenbench.backbones import backbone_of
from tokenbench.registry import GridRestore, Method, register


@register
class NoReduction(Method):
    name = "none"
    family = "none"
    version = "1"
    summary = "The dense model (no token reduction)."
    backbones = ("vit", "convnext", "swin")
    restores_grid = GridRestore.KEEPS
    params = ()

    def apply(self, model, **params):
        # Through the shared surgery, so that token counts are recorded like every method's.
        backbone_of(model, self.name).prepare(self.name)
        return model

    def expected_tokens(self, model, **params):
        dense = backbone_of(model, self.name).dense_tokens()
        return dense, list(dense)
