"""fashion-mnist-scenes: generation, caching and the dataset a model reads."""

import numpy as np
import pytest
import torch

from tokenbench import data_scenes as ds
from tokenbench.errors import UserError


@pytest.fixture
def small_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_DATA", str(tmp_path / "cache"))
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        monkeypatch.setitem(ds.SCENE_SIZES, split, n)
    return tmp_path / "cache"


def test_items_hide_no_earlier_item_where_one_fits_and_labels_are_class_plus_one(monkeypatch):
    monkeypatch.setattr(ds, "ITEM_SIDE", (8, 12))  # four such squares always fit side by side
    placed = []
    real = ds.place_item

    def spy(occupied, on, rng):
        hidden, top, left = real(occupied, on, rng)
        placed.append((hidden, int(on.sum())))
        return hidden, top, left

    monkeypatch.setattr(ds, "place_item", spy)
    items = np.full((10, 28, 28), 255, dtype=np.uint8)
    images, masks = ds.compose_scenes(items, np.arange(10), 12, seed=3)
    assert all(hidden == 0 for hidden, _ in placed)
    assert (masks > 0).sum() == sum(area for _, area in placed)  # every item whole
    assert ((images > 0) == (masks > 0)).all() and 1 <= masks.max() <= 10


def test_an_item_with_no_free_place_lies_where_it_hides_fewest_pixels():
    occupied = np.ones((56, 56), dtype=bool)
    occupied[40:, 40:] = False
    on = np.ones((10, 10), dtype=bool)
    free = np.zeros((56, 56), dtype=bool)
    assert ds.place_item(free, on, np.random.default_rng(0))[0] == 0
    hidden, top, left = ds.place_item(occupied, on, np.random.default_rng(0))
    tries = np.random.default_rng(0).integers(0, 47, size=(ds.PLACE_TRIES, 2))
    fewest = min(int(occupied[t:t + 10, l:l + 10].sum()) for t, l in tries)
    assert hidden == fewest == int(occupied[top:top + 10, left:left + 10].sum()) and hidden > 0


def test_scenes_are_seeded_and_mask_follows_item_pixels():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 20)
    a = ds.compose_scenes(items, labels, 6, seed=1)
    b = ds.compose_scenes(items, labels, 6, seed=1)
    c = ds.compose_scenes(items, labels, 6, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    images, masks = a
    assert (images[masks > 0] > ds.ITEM_THRESHOLD).all() and (images[masks == 0] == 0).all()
    assert masks.max() <= 10


def test_scenes_are_cached_and_each_split_draws_from_its_own_images(small_scenes, monkeypatch):
    from tokenbench import data as data_mod

    asked = []
    real = data_mod.load_fashion_mnist

    def spy(split="test", data_dir=None):
        asked.append(split)
        return real(split, data_dir)

    monkeypatch.setattr(data_mod, "load_fashion_mnist", spy)
    x1, m1 = ds.load_scenes("train")
    ds.load_scenes("val")
    ds.load_scenes("test")
    assert asked == ["train", "val", "test"]  # val scenes from the held-out val images, never train's
    assert len(list((small_scenes / "scenes").glob("*.npz"))) == 3
    x2, m2 = ds.load_scenes("train")
    assert asked == ["train", "val", "test"]  # read from the cache
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert len({ds.scenes_fingerprint(s) for s in ("train", "val", "test")}) == 3


def test_scene_dataset_gives_model_input_and_long_mask(small_scenes):
    from tokenbench.models_seg import build_seg_model

    d, spec = ds.build_dense_dataset(ds.SCENES, "test", model=build_seg_model("default-seg"), limit=4)
    x, y = d[0]
    assert x.shape == (1, 56, 56) and y.shape == (56, 56) and y.dtype == torch.long
    assert spec.n == 4 and spec.available == 8 and spec.classes == 11
    with pytest.raises(UserError, match="more than"):
        ds.build_dense_dataset(ds.SCENES, "test", model=build_seg_model("default-seg"), limit=9)
