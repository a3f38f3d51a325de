"""Which input made a number: the synthetic (random) input, or real images of a dataset.

A method whose token count depends on the image (it declares no token schedule) counts other
FLOPs and runs at another speed on other images.  Its FLOPs (the matched-FLOPs search included)
and timings are made on real images where a dataset is given, and the record says which
(``metrics["input"]``; the key carries the data and the image count); made on the random input
instead, they carry a warning.  Methods with a declared schedule keep the random input, and
their records stay as they were.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import UserError

SEARCH_IMAGES = 64  # images a matched-FLOPs search (and a sweep's FLOPs record) counts per-image methods on
SYNTHETIC_FLOPS = "FLOPs of one synthetic image; pass --data for the mean over real images"
RANDOM_TIMING = ("timed on a random input, but this method's token count depends on the image; "
                 "time it on real images (--data)")


def varies_per_image(cls, net, params: dict) -> bool:
    """True when the method declares no token schedule on ``net`` (its count depends on the image)."""
    try:
        return cls().expected_tokens(net, **params) is None
    except UserError:
        return False


def data_images(net, data: str, split: str, data_dir: Optional[str], n: int, seed: int,
                asked: Optional[int] = -1):
    """(images [n, C, H, W], DataSpec): the seeded, class-stratified subset of ``n`` images of
    ``data`` that an evaluation with ``--limit n --seed seed`` reads.  A set smaller than
    ``asked`` (default ``n``; None: no check, the whole set) is refused."""
    from . import checks
    from .data import build_dataset
    from .data_scenes import build_dense_dataset, is_dense_data

    if is_dense_data(data):  # a dense set's scenes (their masks unused), the subset an evaluation reads
        ds, dspec = build_dense_dataset(data, split, data_dir, model=net)
        if asked is not None:
            checks.limit_within(n if asked == -1 else asked, dspec.available, dspec.source or f"{data} {split}")
        if n < dspec.available:  # (asked=None: a set smaller than n is taken whole)
            ds, dspec = build_dense_dataset(data, split, data_dir, model=net, limit=n, seed=seed)
    else:
        ds, dspec = build_dataset(data, split, data_dir, model=net, limit=n, seed=seed)
        checks.limit_within(n if asked == -1 else asked, dspec.available, dspec.source or f"{data} {split}")
    return torch.stack([ds[i][0] for i in range(len(ds))]), dspec


def data_key(data: str, split: str, data_dir: Optional[str], n: int, seed: int) -> dict[str, Any]:
    """The identity of ``n`` images of ``data`` (a key field): name, fingerprint, split, count, seed."""
    from . import identity
    from .data_scenes import dense_fingerprint, is_dense_data

    data_id = dense_fingerprint(data, split, data_dir) if is_dense_data(data) else \
        identity.data_fingerprint(data, split, data_dir)
    return {"data": data, "data_id": data_id, "split": split, "images": n, "data_seed": seed}


def described(data: Optional[str] = None, split: Optional[str] = None, n: int = 1,
              seed: Optional[int] = None) -> dict[str, Any]:
    """What a record says of its input: ``{"source": "data", ...}`` or ``{"source": "random-input", "images": n}``."""
    if data is None:
        return {"source": "random-input", "images": n}
    return {"source": "data", "data": data, "split": split, "images": n, "seed": seed}
