"""The `methods-deit-s` figure recipe: every registered reduction method on DeiT-S at 50-90% of
its FLOPs, and the published DeiT-S figures it compares with, each with its source.

Running the recipe takes minutes (75 matched-FLOPs searches); `tokenbench figure methods-deit-s
--no-throughput` is the check (docs/paper-figures.md).  These tests hold what
can be checked in a second: the recipe covers every method, and its published rows are usable.
"""

from __future__ import annotations

from tokenbench import registry
from tokenbench.figures.recipe import arch, load_published, load_recipe

RECIPE = "methods-deit-s"


def test_every_registered_method_is_in_the_recipe():
    rec = load_recipe(RECIPE)
    methods = {body.get("method", label) for label, body in rec.sweep["methods"].items()}
    assert methods == set(registry.load_methods())          # a new method must join the figure
    assert rec.sweep["flops_targets"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert rec.sweep["models"] == ["deit_small_patch16_224.fb_in1k"]


def test_published_rows_of_its_papers_are_sourced_and_valid():
    rec = load_recipe(RECIPE)
    rows = [p for p in load_published() if p.paper in rec.papers and arch(p.model) == "deit_small_patch16_224"]
    assert {p.paper for p in rows} == set(rec.papers)                      # every paper has a DeiT-S row
    for p in rows:
        assert p.source and (p.gflops is not None or p.top1 is not None), p.row
        registry.get_method(p.method).validate(dict(p.params))             # a setting we can run
    # the new papers' rows: each names where it comes from
    for paper in ("PPT", "DiffRate", "MCTF", "Zero-TPrune"):
        mine = [p for p in rows if p.paper == paper and p.method != "none"]
        assert len(mine) == 1 and mine[0].gflops is not None and mine[0].top1 is not None, paper
