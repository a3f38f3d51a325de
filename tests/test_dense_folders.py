"""Segmentation folders in the VOC and ADE20K layouts: reading, label mapping, the evaluation
transform, fingerprints and the refusals of bad folders."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbench import data_seg_folders as sf
from tokenbench.errors import UserError


def mask_png(m, path, palette=True):
    im = Image.fromarray(m.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette([0, 0, 0, 128, 0, 0] * 128)
    im.save(path)


def write_voc(root, ids=("a", "b"), mask_size=None, label=3, listed=None, size=(20, 30)):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(ids):
        Image.fromarray(np.full((*size, 3), 100 + k, dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        m = np.zeros(mask_size or size, dtype=np.uint8)
        m[5:10, 5:15] = label
        m[0, 0] = 255
        mask_png(m, root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(ids if listed is None else listed) + "\n")
    return root


def write_ade(root, names=("ADE_x_1", "ADE_x_2", "ADE_x_3"), mask_size=None, labels=(0, 5, 150),
              splits=("training", "validation")):
    """The SceneParsing release's layout: grey masks, 0 = other, 1..150 the classes."""
    for split in splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(names):
            Image.fromarray(np.full((32, 32, 3), 90 + k, dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            m = np.full(mask_size or (32, 32), labels[0], dtype=np.uint8)
            m[8:24, 8:16] = labels[1]
            m[8:24, 16:24] = labels[2]
            mask_png(m, root / "annotations" / split / f"{name}.png", palette=False)
    return root


def folder(name, root, split="val", size=16):
    return sf.SegmentationFolder(name, root, split, size, 3, (0.5,) * 3, (0.25,) * 3)


def test_voc_folder_reads_palette_masks(tmp_path):
    d = folder("voc", write_voc(tmp_path / "voc", size=(16, 16)))
    x, y = d[1]
    assert len(d) == 2 and x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.long
    assert set(y.unique().tolist()) == {0, 3, 255} and (y == 3).sum() == 50


def test_evaluation_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    root = write_voc(tmp_path / "voc", ids=("a",), size=(20, 40))
    m = np.zeros((20, 40), dtype=np.uint8)
    m[:, :8] = 3      # the left fifth: outside the centre square once the shorter side is 16
    m[:, 16:24] = 4   # the middle: inside it
    mask_png(m, root / "SegmentationClass" / "a.png")
    x, y = folder("voc", root)[0]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    assert 3 not in y.tolist()[0] and (y == 4).all(0).sum() in (6, 7)  # 8 of 40 columns at 0.8 scale (3 if stretched)


def test_ade20k_labels_shift_down_and_other_is_not_scored(tmp_path):
    root = write_ade(tmp_path / "ADEChallengeData2016")
    for d in (folder("ade20k", root, size=32), folder("ade20k", tmp_path, "train", 32)):  # the release or its parent
        x, y = d[0]
        assert len(d) == 3 and x.shape == (3, 32, 32)
        assert y[0, 0] == 255 and y[10, 10] == 4 and y[10, 20] == 149
    assert len(sf.layout_classes("ade20k")) == 150 and len(sf.layout_classes("voc")) == 21


@pytest.mark.parametrize("name,kw,msg", [
    ("voc", {"mask_size": (10, 30)}, "must match its image"),
    ("voc", {"label": 40}, "holds label 40, outside the 21 classes"),
    ("voc", {"listed": []}, "the val split is empty"),
    ("ade20k", {"mask_size": (32, 16)}, "must match its image"),
    ("ade20k", {"labels": (0, 5, 151)}, "holds label 151, outside the 150 classes"),
    ("ade20k", {"splits": ("training",)}, "has no images/validation/"),
])
def test_bad_folders_are_refused_in_one_line(tmp_path, name, kw, msg):
    root = (write_voc if name == "voc" else write_ade)(tmp_path / name, **kw)
    with pytest.raises(UserError, match=msg):
        folder(name, root)[0]


def test_an_empty_ade20k_split_and_its_unannotated_test_split_are_refused(tmp_path):
    root = write_ade(tmp_path / "ade", names=())
    shutil.rmtree(write_ade(tmp_path / "no-masks") / "annotations" / "validation")
    with pytest.raises(UserError, match="has no annotations/validation/"):
        folder("ade20k", tmp_path / "no-masks")
    with pytest.raises(UserError, match="the val split is empty"):
        folder("ade20k", root)
    with pytest.raises(UserError, match="its test images have no annotations"):
        folder("ade20k", root, "test")


@pytest.mark.parametrize("name", ["voc", "ade20k"])
def test_fingerprint_follows_content_not_location(tmp_path, name):
    root = (write_voc if name == "voc" else write_ade)(tmp_path / "a" / name)
    fp = sf.layout_fingerprint(name, "val", root)
    moved = tmp_path / "b" / name
    shutil.copytree(root, moved)
    assert sf.layout_fingerprint(name, "val", moved) == fp and fp.startswith(f"{name}-val:")
    mask = next((moved / ("SegmentationClass" if name == "voc" else "annotations/validation")).glob("*.png"))
    m = np.array(Image.open(mask))
    m[1, 1] = 1
    mask_png(m, mask, palette=name == "voc")
    assert sf.layout_fingerprint(name, "val", moved) != fp
