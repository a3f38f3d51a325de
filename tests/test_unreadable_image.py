"""One unreadable image in a folder dataset is the user's to fix: one line naming it, exit 2."""

import numpy as np

from tokenbench.errors import UserError, user_message

from conftest import register_tiny_timm

TINY = register_tiny_timm("tiny_vit_unreadable_image")


def _tree(root, classes=10, per_class=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "val" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_unreadable_image_is_one_line_exit_2(cli, tmp_path):
    root = _tree(tmp_path / "d")
    bad = root / "val" / "c3" / "broken.png"
    bad.write_bytes(b"not an image at all")
    code, out, err = cli("eval", TINY, "--data", "folder", "--data-dir", str(root), "--device", "cpu")
    assert code == 2, err
    assert err.strip() == f"error: cannot read image {bad}; remove or fix it (UnidentifiedImageError)"


def test_a_user_error_from_a_loader_worker_is_its_own_line():
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\ntokenbench.errors.UserError: cannot read image a.png; "
                        "remove or fix it (OSError)\n")
    assert user_message(wrapped) == "cannot read image a.png; remove or fix it (OSError)"
    assert user_message(UserError("plain")) == "plain"
