"""`resize`: the dense model at a lower input resolution (a baseline every token method must beat).

The image is resized inside the model (bilinear, antialiased) to a smaller patch grid, the
patch embedding runs at that size and the position embeddings are resampled to the grid as
timm does for other image sizes (``timm.layers.resample_abs_pos_embed``); every block then
runs dense on the fewer tokens.  Nothing is dropped or merged: the whole image is seen, less
sharply.  Critiques of token reduction (VTC-Bench 2025; "Are we solving the right problem?",
ACL Findings 2025) find such downsampling level with many methods at the same compute.

The knob ``scale`` is the fraction of the patch tokens kept (the image's area scale).  The grid
is the one whose patch count is nearest ``scale`` times the model's, among grids whose aspect
ratio is stretched by at most ``max_stretch`` (1.4 by default: 7x7 -> 7x6, 6x6, 7x5, 6x5,
5x5, ...), so that a matched-FLOPs search lands within a point of its target where square
grids cannot (on the embedded model 6x6 is 72% of the dense FLOPs and 7x5 70%);
``max_stretch=1`` keeps the model's aspect ratio exactly (coarser steps: 7x7 -> 6x6 -> 5x5).  The image is resized from the model's input
size, not from the original picture: a pipeline that resized the original directly to the
smaller size would differ slightly.
"""

from __future__ import annotations

from tokenbench.backbones import backbone_of
from tokenbench.registry import GridRestore, Method, Param, register


def resized_grid(grid: tuple[int, int], scale: float, max_stretch: float = 1.4) -> tuple[int, int]:
    """The patch grid (rows, columns) at area ``scale`` of ``grid``: the patch count nearest
    ``scale * rows * columns`` among grids no larger than ``grid`` whose aspect ratio is stretched
    by at most ``max_stretch`` from the model's; ties go to the lesser stretch, then to the larger
    grid, then to more rows."""
    rows, cols = grid
    goal = scale * rows * cols
    best, best_key = grid, None
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            stretch = max(r * cols / (c * rows), c * rows / (r * cols))
            if stretch > max_stretch + 1e-9:
                continue
            key = (abs(r * c - goal), stretch, -r * c, -r)
            if best_key is None or key < best_key:
                best, best_key = (r, c), key
    return best


@register
class Resize(Method):
    name = "resize"
    version = "1"
    summary = ("The dense model at a lower input resolution: the image resized to a smaller patch grid, "
               "position embeddings resampled as timm does (a baseline).")
    params = (
        Param("scale", "float", 0.7, "fraction of the patch tokens kept: the image's area scale "
              "(the nearest grid is used)", min=0.0, max=1.0, min_exclusive=True),
        Param("max_stretch", "float", 1.4, "largest stretch of the aspect ratio a grid may have (1: the "
              "model's exactly, coarser FLOPs steps)", min=1.0, max=4.0),
    )
    family = "baseline"
    learned = False
    deterministic = True
    knob = "scale"
    restores_grid = GridRestore.UNMERGE
    compile_note = "static token counts: fullgraph (the grid is fixed by scale)"

    def grid(self, model, scale: float = 0.7, max_stretch: float = 1.4) -> tuple[int, int]:
        return resized_grid(backbone_of(model, self.name).grid, scale, max_stretch)

    def apply(self, model, scale: float = 0.7, max_stretch: float = 1.4, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.input_grid = resized_grid(bb.grid, scale, max_stretch)
        return model

    @classmethod
    def reduces(cls, params):
        return params["scale"] < 1

    def expected_tokens(self, model, scale: float = 0.7, max_stretch: float = 1.4, **params):
        bb = backbone_of(model, self.name)
        r, c = resized_grid(bb.grid, scale, max_stretch)
        n = [r * c + bb.n_prefix] * bb.depth
        return n, list(n)
