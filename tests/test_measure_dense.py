"""Dense measurements: confusion matrices, mIoU, bootstrap intervals, the paired per-image test, FLOPs apart."""

import math

import pytest
import torch

from tokenbench.measure import dense as md


def slow_confusion(pred, target, k):
    out = torch.zeros(len(pred), k, k, dtype=torch.long)
    for b in range(len(pred)):
        for t, p in zip(target[b].flatten().tolist(), pred[b].flatten().tolist()):
            if t != 255:
                out[b, t, p] += 1
    return out


def test_confusion_matches_a_loop_and_skips_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 6, 7), generator=g)
    target = torch.randint(0, 5, (3, 6, 7), generator=g)
    target[0, :2] = 255
    cm = md.confusion(pred, target, 5)
    assert torch.equal(cm, slow_confusion(pred, target, 5))
    assert int(cm[0].sum()) == 6 * 7 - 14


def test_miou_and_pixel_accuracy_on_a_known_case():
    # labels: 0 0 1 1 ; predictions: 0 1 1 1 -> IoU(0) = 1/2, IoU(1) = 2/3, class 2 absent (not averaged)
    cm = md.confusion(torch.tensor([[[0, 1, 1, 1]]]), torch.tensor([[[0, 0, 1, 1]]]), 3).sum(0)
    ious = md.iou_per_class(cm)
    assert ious[:2].tolist() == pytest.approx([0.5, 2 / 3]) and math.isnan(ious[2])
    assert float(md.mean_iou(cm)) == pytest.approx((0.5 + 2 / 3) / 2)
    assert float(md.pixel_accuracy(cm)) == pytest.approx(0.75)


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (40, 8, 8), generator=g)
    pred = torch.where(torch.rand(40, 8, 8, generator=g) < 0.7, target, torch.randint(0, 4, (40, 8, 8), generator=g))
    per_image = md.confusion(pred, target, 4)
    est = float(md.mean_iou(per_image.sum(0)))
    lo, hi = md.bootstrap_interval(per_image, samples=300)
    assert lo < est < hi and hi - lo < 0.2
    assert md.bootstrap_interval(per_image, samples=300) == (lo, hi)
    one = md.bootstrap_interval(per_image[:1].repeat(40, 1, 1), samples=300)
    assert one[0] == pytest.approx(one[1])  # identical images: no spread


def test_paired_test_on_per_image_iou():
    a = [0.5 + 0.01 * i for i in range(30)]
    same = md.paired_iou_test(a, a)
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0
    better = md.paired_iou_test([x + 0.05 for x in a], a)
    assert better["mean_diff"] == pytest.approx(0.05) and better["p_value"] < 0.001
    assert better["diff_ci95"][0] == pytest.approx(0.05) and better["diff_ci95"][1] == pytest.approx(0.05)
    mixed = md.paired_iou_test([x + (0.05 if i % 2 else -0.05) for i, x in enumerate(a)], a)
    assert mixed["p_value"] > 0.5 and mixed["diff_ci95"][0] < 0 < mixed["diff_ci95"][1]
    with pytest.raises(Exception, match="same images"):
        md.paired_iou_test(a, a[:-1])


@pytest.mark.parametrize("name", ["default-seg", "default-convnext-seg"])
def test_dense_flops_split_into_backbone_and_decoder(name):
    from tokenbench.measure.flop_count import fvcore_count
    from tokenbench.models_seg import build_seg_model

    m = build_seg_model(name).eval()
    f = md.dense_flops(m)
    assert f["gflops"] == pytest.approx(f["gflops_backbone"] + f["gflops_decoder"])
    assert f["gflops_decoder"] > 0 and f["gflops_backbone"] > 10 * f["gflops_decoder"]
    feats = [t.detach() for t in m.features(torch.randn(1, 1, 56, 56))]
    head, _ = fvcore_count(m.decoder, (feats,))
    assert f["gflops_decoder"] * 1e9 >= head  # the head's multiply-adds, plus the upsampling


def test_evaluate_dense_on_a_perfect_and_a_constant_predictor():
    target = torch.randint(0, 3, (6, 8, 8), generator=torch.Generator().manual_seed(2))
    images = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    data = list(zip(images, target))
    perfect = md.evaluate_dense(torch.nn.Identity(), data, 3, batch_size=4)
    assert perfect["miou"] == pytest.approx(100) and perfect["pixel_accuracy"] == pytest.approx(100)
    assert perfect["per_image_iou"] == pytest.approx([1.0] * 6) and perfect["n"] == 6

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)

    zero = md.evaluate_dense(Zero(), data, 3, batch_size=4)
    share = float((target == 0).float().mean())
    assert zero["pixel_accuracy"] == pytest.approx(100 * share)
    assert zero["miou"] == pytest.approx(100 * share / 3) and zero["per_class_iou"][1] == 0
