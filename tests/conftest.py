"""Shared fixtures: tiny random timm ViTs, in-process CLI, hypothesis settings."""

import os

os.environ.setdefault("TOKENBENCH_QUIET", "1")

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("tokenbench", deadline=None, max_examples=10, derandomize=True)
    settings.load_profile("tokenbench")
except ImportError:  # pragma: no cover
    pass

# One thread: the machine has two cores and a background job may use the other;
# oversubscribed OpenMP threads slow everything down many times over.
torch.set_num_threads(1)


def tiny_vit(**kw):
    """A depth-12 ViT small enough to run in milliseconds (reduction sites exist at 3, 6, 9)."""
    import timm

    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


@pytest.fixture
def tiny():
    return tiny_vit()


def run_cli(args, out, err) -> int:
    """The CLI run in-process on ``args`` with stdout and stderr written to ``out`` and ``err``;
    its exit code."""
    import sys

    from tokenbench.cli.main import main

    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        main(list(args))
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr = old


@pytest.fixture
def cli():
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from io import StringIO

    def run(*args):
        out, err = StringIO(), StringIO()
        code = run_cli(args, out, err)
        return code, out.getvalue(), err.getvalue()

    return run


def register_tiny_timm(name: str, **overrides) -> str:
    """Register a depth-12 tiny ViT under a timm model ``name`` (sweeps and the CLI take names).

    32 px, patch 4: 64 patch tokens + class token; ``overrides`` change the defaults.
    """
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(name):
        return name
    defaults = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    defaults.update(overrides)

    def build(pretrained=False, **kw):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kw.pop(k, None)
        return VisionTransformer(**{**defaults, **kw})

    build.__name__ = name
    build.__module__ = "conftest"
    register_model(build)
    return name


def peak_weights(m, seed: int = 0):
    """Re-draw ``m``'s weights large enough for peaked attention and O(1) logits, so that
    comparisons against references are not won by near-ties.  Returns ``m``."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and "pos_embed" not in n and "token" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p[0].numel())))
            elif "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


def random_images(model, b: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(b, 3, h, w, generator=g).to(dtype)


def write_sweep(path, model: str, methods: str, *, out=None, measure=("flops", "accuracy"), limit=16,
                batch_size=None, top: str = "", tables: str = "", name: str = "t"):
    """A sweep file ``path`` measuring ``model`` on the CPU: ``measure`` on ``limit`` synthetic images
    (None: no data; ``measure`` None: the sweep's default), then the ``methods`` tables (TOML text); ``top`` adds top-level lines,
    ``tables`` other tables.  Returns ``path``."""
    import json
    import textwrap

    lines = [f'name = "{name}"'] + ([f'out = "{out}"'] if out is not None else [])
    lines += [f'models = ["{model}"]'] + ([f"measure = {json.dumps(list(measure))}"] if measure else [])
    lines += ['device = "cpu"']
    lines += textwrap.dedent(top).strip().splitlines()
    if limit is not None:
        lines += ["[data]", 'name = "synthetic"', f"limit = {limit}"] + ([f"batch_size = {batch_size}"] if batch_size else [])
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(tables) + textwrap.dedent(methods))
    return path


# timings short enough for a test (a busy machine's retries change no table value: only time)
QUICK_THROUGHPUT = """
[throughput]
batch_size = 4
threads = 1
min_run_time = 0.02
latency = false
retries = 0
rounds = 3
"""


def measured(sweep_file, out):
    """The sweep in ``sweep_file`` measured into ``out``; returns its results folder."""
    from tokenbench import sweep as S
    from tokenbench.store import Store

    sw = S.load_sweep(sweep_file, {"out": str(out)})
    results, runs, _, _ = S.prepare(sw)
    S.execute(sw, runs, Store(results))
    return results


# what a report test sweeps: a frontier of two top-k rates and a seeded method averaged over seeds
REPORT_METHODS = """
[methods.topk]
keep_rate = [0.5, 0.7]
[methods.random]
keep_rate = 0.6
"""


def plotted_figures(res: dict, out, monkeypatch) -> dict:
    """The report's figures for ``res``, kept open by name (nothing is written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenbench.report.plot import plot

    figs = {}

    def keep(fig, base):
        figs[base.name] = fig
        return [base]

    monkeypatch.setattr(plt, "close", lambda fig: None)
    plot(res, out, save=keep)
    return figs


# A tiny embedded-model architecture (grayscale 28 px, like `default`, milliseconds per batch).
SMALL_EMBEDDED = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0, "stem_channels": [8, 16]}


@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    """A tiny stand-in for the embedded model, so `default` resolves without the real checkpoint."""
    import json

    from tokenbench import models
    from tokenbench.train import finalize

    d = tmp_path / "embedded"
    torch.manual_seed(0)
    finalize(models.build_embedded(SMALL_EMBEDDED), d)
    (d / "config.json").write_text(json.dumps({"arch": SMALL_EMBEDDED}))
    monkeypatch.setattr(models, "EMBEDDED_DIR", d)
    return d


# A tiny hierarchical embedded model: stage 3 still 7 x 7 at 28 px, a few thousand weights.
SMALL_EMBEDDED_CONVNEXT = {"family": "convnext", "depths": [1, 1, 4, 1], "dims": [8, 16, 16, 32]}


@pytest.fixture
def tiny_default_convnext(tmp_path, monkeypatch):
    """A tiny stand-in for `default-convnext`, so the name resolves without the real checkpoint."""
    import json

    from tokenbench import models
    from tokenbench.train import finalize

    d = tmp_path / "embedded-convnext"
    torch.manual_seed(0)
    m = models.build_embedded(SMALL_EMBEDDED_CONVNEXT)
    finalize(m, d)
    (d / "config.json").write_text(json.dumps({"arch": m.tokenbench_arch}))  # every key, as training writes
    monkeypatch.setattr(models, "EMBEDDED_CONVNEXT_DIR", d)
    return d


# --------------------------------------------------------------------------- methods against references

VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=12, num_heads=3)  # 16 patches
VIT_SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=12, num_heads=3)  # 64 patches
# the prefix layouts a ViT method must handle
VIT_VARIANTS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2)),  # 3 prefix tokens
}


def small_vit(img: int = 64, patch: int = 8, **kw) -> torch.nn.Module:
    """A depth-12, width-48 random ViT with timm's initialisation and 7 classes."""
    import timm

    torch.manual_seed(0)
    a = dict(img_size=img, patch_size=patch, embed_dim=48, depth=12, num_heads=3, num_classes=7)
    a.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **a).eval()


def peaked_vit(variant: str = "cls", size: dict = VIT_SMALL, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random ViT of one prefix layout, with weights strong enough for peaked attention and
    O(1) logits."""
    import timm

    name, kw = VIT_VARIANTS[variant]
    torch.manual_seed(seed)
    m = timm.create_model(name, num_classes=7, **size, **kw, **extra).eval()
    return peak_weights(m, seed)


def assert_close_to_reference(out, ref, rel: float) -> None:
    """``out`` equals the reference logits within ``rel`` of their largest entry, and those logits
    are not trivially small."""
    scale = ref.abs().max().item()
    assert scale > 0.5
    torch.testing.assert_close(out.to(ref.dtype), ref, atol=rel * scale, rtol=0)


def assert_matches_reference(method: str, reference, variant: str = "cls", rel: float = 1e-5,
                             dtype=torch.float64, n: int = 3, **params) -> None:
    """``method`` at ``params`` on a peaked ViT (:func:`peaked_vit`) gives the logits of
    ``reference(model, images)`` (computed in float64) within ``rel``; in float64 its tokens also
    stand for the reference's groups of patches (``reference`` returns (logits, members))."""
    from tokenbench import registry
    from tokenbench.backbones import set_track_source

    model = peaked_vit(variant).to(dtype)
    imgs = random_images(model, n, dtype=dtype)
    registry.apply(model, method, **params)
    set_track_source(model, dtype == torch.float64)
    with torch.no_grad():
        out = model(imgs)
        ref, members = reference(model.double(), imgs.double())
    assert_close_to_reference(out, ref, rel)
    if dtype == torch.float64:
        assert_sources_are(model, members)


def assert_sources_are(model, members) -> None:
    """The last forward's tokens, in the reference's order, stand for the reference's groups of
    patches (``members[b][t]``: the original token indices token ``t`` of image ``b`` covers)."""
    from tokenbench.backbones import last_state

    src = last_state(model).source
    for b, mem in enumerate(members):
        want = torch.zeros(len(mem), src.shape[-1], dtype=src.dtype)
        for t, s in enumerate(mem):
            want[t, sorted(s)] = 1
        assert torch.equal(src[b], want)


def assert_counts_declared(model, method: str, **params):
    """With ``method`` applied at ``params``, a forward of two images passes the token counts the
    method declares; returns them."""
    from tokenbench import registry
    from tokenbench.backbones import last_state

    registry.apply(model, method, **params)
    with torch.no_grad():
        model(random_images(model, 2))
    st = last_state(model)
    want = registry.get_method(method)().expected_tokens(model, **params)
    assert (st.tokens, st.tokens_mlp) == want
    return want


def assert_batch_independent(model, imgs, deterministic: bool = True) -> None:
    """Each image's logits do not depend on the rest of its batch (and, if ``deterministic``, a
    second forward gives the same logits exactly)."""
    with torch.no_grad():
        full = model(imgs)
        again = model(imgs)
        single = torch.cat([model(imgs[i:i + 1]) for i in range(len(imgs))])
    if deterministic:
        assert torch.equal(full, again)
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


def assert_unchanged_by(model, method: str, atol: float = 1e-5, **params) -> None:
    """``method`` at ``params`` (a setting that reduces nothing) leaves the model's logits as they were."""
    from tokenbench import registry

    imgs = random_images(model, 2)
    with torch.no_grad():
        dense = model(imgs)
        registry.apply(model, method, **params)
        out = model(imgs)
    torch.testing.assert_close(out, dense, atol=atol, rtol=atol)


def assert_deterministic(model) -> None:
    """Two forwards of the same images give the same logits exactly."""
    x = random_images(model, 2)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def assert_refused(method: str, *bad: dict) -> None:
    """Each of the ``bad`` parameter settings is refused by ``method``'s validation."""
    from tokenbench import registry
    from tokenbench.errors import UserError

    for params in bad:
        with pytest.raises(UserError):
            registry.get_method(method).validate(params)


def tracked_state(model, method: str, n: int = 3, **params):
    """The token state after ``method`` (at ``params``, source map tracked) runs on ``n`` images."""
    from tokenbench import registry
    from tokenbench.backbones import last_state, set_track_source

    registry.apply(model, method, **params)
    set_track_source(model, True)
    with torch.no_grad():
        model(random_images(model, n))
    return last_state(model)


def assert_batch_equals_per_image(net, imgs, ref: list) -> list:
    """A batched forward of a per-image method gives each image's reference logits and token counts
    (``ref[i]`` = (logits, counts per block)); returns the counts."""
    from tokenbench.backbones import last_state

    with torch.no_grad():
        got = net(imgs)
        per_image = last_state(net).tokens_per_image()
    torch.testing.assert_close(got, torch.stack([r[0] for r in ref]), rtol=1e-4, atol=1e-4)
    counts = [r[1] for r in ref]
    assert per_image.tolist() == counts
    return counts


def deit_s_schedule(method: str, **params):
    """The token counts ``method`` declares on DeiT-S's geometry (197 tokens, 12 blocks)."""
    import timm

    from tokenbench import registry

    return registry.get_method(method)().expected_tokens(timm.create_model("deit_small_patch16_224", num_classes=10),
                                                          **params)


def assert_same_as_timm(ref, net, x) -> None:
    """``net`` (a copy of ``ref`` with the dense method applied) gives timm's logits exactly, and
    intermediates of timm's shapes."""
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
        got = net.forward_intermediates(x, intermediates_only=True)
        want = ref.forward_intermediates(x, intermediates_only=True)
    assert [t.shape for t in got] == [t.shape for t in want]


def slow_fast(net, keep: int, fast):
    """A toy plan on a hierarchical model: at every stage-3 block, the slow path on the ``keep``
    positions of largest norm, ``fast`` on the rest."""
    from tokenbench.backbones import backbone_of

    bb = backbone_of(net)
    plan = bb.prepare("toy")
    for i in bb.sites("stage 3"):
        plan.subset[i] = lambda block, t, st: (t.norm(dim=-1).topk(keep, dim=1).indices, fast)
    return net


def assert_traceable(model) -> None:
    """``torch.jit.trace`` on one batch gives the model's logits on another."""
    x, y = random_images(model, 2, seed=3), random_images(model, 2, seed=4)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(y), model(y))


# one image's ViT computed by hand, operation by operation (the loops references are written in)

def ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def lin(x, mod):
    return x @ mod.weight.T + mod.bias


def gelu(x):
    import math

    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_attention(blk, t):
    """Plain multi-head self-attention of one image's tokens t [N, C]; also the class token's
    attention to every token, averaged over heads."""
    import math

    a = blk.attn
    n, c = t.shape
    h, hd = a.num_heads, c // a.num_heads
    qkv = lin(ln(t, blk.norm1), a.qkv)
    heads, cls_row = [], torch.zeros(n, dtype=t.dtype)
    for j in range(h):
        q = qkv[:, j * hd:(j + 1) * hd]
        k = qkv[:, c + j * hd:c + (j + 1) * hd]
        v = qkv[:, 2 * c + j * hd:2 * c + (j + 1) * hd]
        att = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)
        heads.append(att @ v)
        cls_row = cls_row + att[0] / h
    return lin(torch.cat(heads, dim=1), a.proj), cls_row


def ref_mlp(blk, t):
    return lin(gelu(lin(ln(t, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)


def ref_embed(model, img):
    """One image's tokens [N, C] after the patch embedding, positions and prefix tokens."""
    return model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]


def ref_attend(blk, x, bias=None):
    """``blk``'s attention residual on one image's tokens x [N, C], written out per head and query
    (``bias`` [N], if given, added to every query's scores).  Returns (x after the residual, the keys
    [N, H, D], the class token's attention averaged over heads [N])."""
    at = blk.attn
    n = x.shape[0]
    qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    heads, cls_rows = [], []
    for hh in range(at.num_heads):
        rows = []
        for i in range(n):
            s = (k[:, hh] @ q[i, hh]) * at.head_dim ** -0.5
            a = torch.softmax(s if bias is None else s + bias, 0)
            if i == 0:
                cls_rows.append(a)
            rows.append(a @ v[:, hh])
        heads.append(torch.stack(rows))
    return x + at.proj(torch.cat(heads, dim=-1)), k, sum(cls_rows) / len(cls_rows)


def ref_head(model, x, size=None):
    """The logits of one image's final tokens x [N, C]: the size-weighted average of the patch
    tokens, the mean of a distilled model's two heads, or the class token's."""
    p = model.num_prefix_tokens
    x = model.norm(x)
    if model.global_pool == "avg":
        return model.head(model.fc_norm((x[p:] * size[p:, None]).sum(0) / size[p:].sum()))
    if getattr(model, "head_dist", None) is not None:
        return (model.head(x[0]) + model.head_dist(x[1])) / 2
    return model.head(model.fc_norm(x[0]))
