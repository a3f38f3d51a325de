"""Paper figures: recipes that regenerate the papers' tables and plots, ours beside theirs.

A figure recipe (``tokenbench/recipes/figures/<name>.toml``) is a sweep (the ``[sweep]`` table,
in the format of :mod:`tokenbench.sweep`: models, methods, parameter grids or FLOPs
targets, throughput settings) plus what the figure needs beyond it (the ``[figure]``
table)::

    [figure]
    description = "one line"          # `tokenbench figure list`
    papers = ["DynamicViT"]           # which papers' rows of published.csv to compare with
    x = "keep_rate"                   # first panel's x axis: a method parameter, or "target"
    data = "imagenet"                 # the dataset accuracy is measured on (with --data-dir)
    split = "val"

    [figure.checkpoints.<label>]      # checkpoint files a method entry uses, in --checkpoint-dir
    file = "dynamicvit-deit-s-{value}.pth"   # {value}: the entry's searched parameter (keep_rate, r)
    help = "where the files come from"       # printed when accuracy cannot be measured without them
    required = false                  # true: drop the entry when its file is missing

    [figure.embedded]                 # the same recipe on the embedded Fashion-MNIST model
    model = "default"                 # which one (`default-convnext` for a ConvNeXt recipe)
    drop = ["label"]                  # entries that make no sense there
    limit = 1000                      # accuracy on a seeded stratified subset of the test split
    [figure.embedded.methods.tome]    # parameter grids replaced for the embedded model
    r = [1, 2, 3, 4]
    [figure.embedded.checkpoints.dynamicvit]
    file = "dynamicvit-{value}/model.pt"     # relative to --checkpoint-dir (default `results`)

    [sweep]                           # a sweep file's content (name and out are set here)
    models = ["deit_small_patch16_224.fb_in1k"]   # timm names with the weight tag the paper used
    [sweep.methods.none]
    [sweep.methods.dynamicvit]
    keep_rate = [0.5, 0.6, 0.7, 0.8, 0.9]

:func:`tokenbench.figures.run.run_figure` builds the sweep (the recipe's, with the command line's data,
weights, checkpoints and throughput settings), runs it with :mod:`tokenbench.sweep` and
:mod:`tokenbench.runner` into ``runs/figures/<name>/`` (records are reused, as in
any sweep, and copied from the committed ``results/figures/<name>/``; only ``--out`` writes there), reads the rows with :func:`tokenbench.report.collect.collect`, matches each row with
the published figures (``recipes/figures/published.csv``: same architecture, method and
parameters, from one of the recipe's papers) and writes ``<name>.md`` and ``<name>.csv``
(ours, published and the difference: GFLOPs, speedup over dense, top-1) and
``<name>.png`` / ``<name>.pdf`` (the published points overlaid).

Without data or real weights everything that needs neither is still produced: GFLOPs and
tokens per block for every row (random weights do not change them), throughput on the
device at hand (``throughput=False`` skips it), and top-1 marked "not measured" with the
command that would measure it.  Accuracy is measured only for runs whose weights are
real (timm's pretrained tag, a checkpoint, the embedded model); a learned method
(DynamicViT) needs its checkpoint.

Published throughput is never set beside ours: each paper's speedup is its own method
over its own dense model on its own hardware, and ours is ours over our dense model on
ours.

One module per job: :mod:`~tokenbench.figures.recipe` (the recipe and published.csv),
:mod:`~tokenbench.figures.plan` (options, checkpoints, the sweep to run), :mod:`~tokenbench.figures.tables`
(our rows beside the published ones, NAME.md / NAME.csv), :mod:`~tokenbench.figures.plot` (the
panels) and :mod:`~tokenbench.figures.run` (a figure planned, run and written).
"""
