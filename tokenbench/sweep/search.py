"""The matched-FLOPs search: the value of a method's budget knob whose FLOPs land closest to a
fraction of the dense model's, every fvcore count cached in the sweep's ``flops_cache.json``."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import UserError
from .dense import apply_to, dense_architecture, gflops_of, method_net
from .format import DEFAULT_TOLERANCE, DENSE_METHOD

CACHE_FILE = "flops_cache.json"


def _backbone(net):
    from ..backbones import backbone_of
    from ..errors import UserError

    try:
        return backbone_of(method_net(net))  # a dense model's encoder
    except UserError:
        return None


def model_depth(net) -> int:
    """How many blocks the model has (0 when its family is unknown)."""
    bb = _backbone(net)
    return 0 if bb is None else bb.depth


def dense_schedule(net) -> Optional[tuple]:
    """The dense model's token schedule (tokens per block, tokens entering each MLP), or None."""
    bb = _backbone(net)
    if bb is None:
        return None
    dense = tuple(float(n) for n in bb.dense_tokens())
    return (dense, dense)


def analytic_block_cost(net, schedule: tuple) -> Optional[float]:
    """Per-image multiply-adds of the blocks for a token schedule (tokens, tokens entering MLP),
    from the backbone's cost model; None for a model it cannot read."""
    bb = _backbone(net)
    return None if bb is None else bb.block_cost(*schedule)


# model identity: reads models.py's architecture tag of the embedded model
def build_architecture(model: str, img_size: Optional[int]) -> tuple[Any, dict]:
    """``model`` with random weights (FLOPs do not depend on them), in eval mode, and the
    identity of its architecture (the FLOPs cache's key)."""
    import timm
    import torch

    from ..models import DENSE_MODELS, build_embedded, create_model, embedded_arch, embedded_paths, is_embedded

    torch.manual_seed(0)
    if model in DENSE_MODELS:
        return dense_architecture(model)
    if is_embedded(model):
        cfg = embedded_paths(name=model)["config"]
        arch = json.loads(cfg.read_text()).get("arch", {}) if cfg.is_file() else {}
        net = build_embedded({**embedded_arch(model), **arch})
        arch_id = {"embedded": net.tokenbench_arch}
    else:
        net, _ = create_model(model, pretrained=False, **({"img_size": img_size} if img_size else {}))
        arch_id = {"timm": model, "img_size": img_size}
    arch_id["timm_version"] = timm.__version__
    net.eval()
    return net, arch_id


class _Refit:
    """fvcore's count predicted from the analytic estimate: after one count a ratio (what the
    analytic cost leaves out, in proportion), after two or more the line through the two counts
    nearest the goal (what it leaves out may also shrink with the tokens: a resized input's stem)."""

    def __init__(self):
        self.points: list[tuple[float, float]] = []

    def add(self, estimate: float, counted: float, goal: float) -> None:
        self.points.append((estimate, counted))
        self.points.sort(key=lambda p: abs(p[1] - goal))

    def __call__(self, estimate: float) -> float:
        if not self.points:
            return estimate
        (e1, g1) = self.points[0]
        other = next(((e, g) for e, g in self.points[1:] if abs(e - e1) > 1e-12 * max(1.0, abs(e1))), None)
        if other is None:
            return estimate * (g1 / e1 if e1 > 0 else 1.0)
        e2, g2 = other
        slope = (g2 - g1) / (e2 - e1)
        return g1 + slope * (estimate - e1) if slope > 0 else estimate * (g1 / e1 if e1 > 0 else 1.0)


@dataclass
class SearchResult:
    value: Any
    gflops: float
    dense_gflops: float
    target: float
    ratio: float
    miss: bool
    checkpointed: bool = False
    counted: int = 0
    input: Optional[dict] = None     # per-image methods only: the images counted (inputs.described)
    warning: Optional[str] = None    # per-image methods searched on the random input

    def as_dict(self) -> dict:
        """The answer, as the plan records it (``input`` and ``warning`` only where set, so a
        method with a declared schedule reads as before)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("input", "warning")}


@dataclass(frozen=True)
class SearchData:
    """Real images on which a method whose token count depends on the image is counted: the
    first ``images`` of the seeded, class-stratified subset of the sweep's data."""

    name: str
    split: str = "test"
    dir: Optional[str] = None
    seed: int = 0
    images: int = 64

    def key(self) -> dict:
        from .. import inputs

        return inputs.data_key(self.name, self.split, self.dir, self.images, self.seed)

    def described(self) -> dict:
        from .. import inputs

        return inputs.described(self.name, self.split, self.images, self.seed)


class FlopsSearch:
    """The parameter value whose FLOPs land closest to a fraction of the dense model's.

    Candidates: for a float knob (a keep rate) every distinct token schedule on a grid of
    0.01 (then 0.005, 0.001) steps over its range, each represented by its roundest value;
    for an ``int_or_list`` knob (tokens merged per block) every constant value ``n`` and,
    between ``n`` and ``n + 1``, the schedules ``n + 1`` for the first ``k`` blocks and ``n``
    after (a constant is coarse on short sequences).  Token schedules come from the
    method's declared ``expected_tokens``; an analytic cost (:func:`analytic_block_cost`)
    ranks them; fvcore counts the nearest ones, a multiplicative correction for what the
    analytic cost leaves out (the method's own scoring, norms, the stem) is refit after each
    count, and the final answer is the fvcore-counted candidate closest to the target (so the
    reported ratio is exact).
    Methods that declare no schedule are searched by bisection on fvcore counts.
    Every fvcore count is cached in ``cache_path`` (JSON), so reruns are quick.
    """

    def __init__(self, cache_path: Optional[Path] = None, force: bool = False, seed_path: Optional[Path] = None,
                 data: Optional[SearchData] = None):
        self.cache_path = Path(cache_path) if cache_path else None
        self.data = data  # where methods with per-image token counts are counted (None: the random input)
        self._weighted: dict[tuple, Any] = {}
        self._images: dict[tuple, Any] = {}
        self._estimates: dict[str, float] = {}
        self.cache: dict[str, float] = {}
        self._damaged: set[str] = set()
        if not force:
            # counts from a reference directory's cache first (keys carry the code identity, so
            # a count made by other code never matches), then this directory's own
            if seed_path is not None and Path(seed_path).is_file():
                self.cache = self._read_cache(Path(seed_path))
            self.cache.update(self._read_cache())
        self._bases: dict[tuple, Any] = {}
        self._cands: dict[str, Any] = {}
        self.counts = 0  # fvcore counts made (not cached)
        self.on_count: Optional[Callable[[int], None]] = None  # told the running total after each count

    # ----------------------------------------------------------- models and counting
    def base(self, model: str, img_size: Optional[int]):
        """The architecture (no method, weights irrelevant to FLOPs) and its identity, built once."""
        key = (model, img_size)
        if key not in self._bases:
            self._bases[key] = build_architecture(model, img_size)
        return self._bases[key]

    def _key(self, model, img_size, method, params, on_data: Optional[dict] = None) -> str:
        from .. import identity
        from ..registry import get_method
        from ..store import canonical

        _, arch_id = self.base(model, img_size)
        key = {"arch": arch_id, "method": method, "params": params,
               "code": identity.method_code(get_method(method)), "protocol": identity.PROTOCOLS["flops"]}
        return canonical({**key, **(on_data or {})})  # a count on images also names them and the weights

    # ----------------------------------------------------------- per-image token counts
    def per_image(self, model: str, img_size: Optional[int], method: str, params: dict) -> bool:
        """Whether ``method(params)`` declares no token schedule on ``model`` (its count, and so
        its FLOPs, depend on the image)."""
        from .. import inputs
        from ..registry import get_method

        cls = get_method(method)
        return inputs.varies_per_image(cls, method_net(self.base(model, img_size)[0]), cls.validate(params))

    def weighted(self, model: str, img_size: Optional[int], weights: tuple = (False, None)):
        """``model`` with the weights a run measures (``weights``: pretrained, checkpoint), no method:
        which tokens a per-image method keeps depends on them."""
        key = (model, img_size, bool(weights[0]), weights[1])
        if key not in self._weighted:
            from ..api import load
            from ..models_seg import is_dense_model
            from ..runner_dense import load_dense

            self._weighted[key] = (load_dense(model, DENSE_METHOD, {}, weights[1]) if is_dense_model(model) else
                                   load(model, "none", {}, pretrained=bool(weights[0]), checkpoint=weights[1],
                                        img_size=img_size))[0].eval()
        return self._weighted[key]

    def images(self, model: str, img_size: Optional[int]):
        """The :attr:`data` images, preprocessed for ``model``."""
        from .. import inputs

        key = (model, img_size)
        if key not in self._images:
            d = self.data
            from ..data_scenes import is_dense_data

            asked = None if is_dense_data(d.name) else -1  # a dense set smaller than this: all of it, as its records
            self._images[key] = inputs.data_images(self.base(model, img_size)[0], d.name, d.split, d.dir, d.images,
                                                   d.seed, asked=asked)[0]
        return self._images[key]

    def _on_data_key(self, model: str, weights: tuple) -> dict:
        from ..runner import weights_id

        return {"input": self.data.key(), "weights": weights_id(model, bool(weights[0]), weights[1])}

    def _applied(self, model, img_size, method, params, weights):
        net = copy.deepcopy(self.weighted(model, img_size, weights))
        return apply_to(net, method, params)  # a dense model's encoder

    def estimate(self, model: str, img_size: Optional[int], method: str, params: dict,
                 weights: tuple = (False, None)) -> Optional[float]:
        """Per-image GFLOPs on the :attr:`data` images from the backbone's cost model (the tokens each
        image keeps, read from one batched forward), averaged; None where the model has no cost model.
        Cheap next to fvcore's count (one trace per image): it steers the search, fvcore decides."""
        import torch

        from ..backbones import last_state

        base = self.base(model, img_size)[0]
        sched = dense_schedule(base)
        a_dense = analytic_block_cost(base, sched) if sched else None
        if a_dense is None:
            return None
        params = self._validated(method, params)
        key = self._key(model, img_size, method, params, self._on_data_key(model, weights))
        if key not in self._estimates:
            images = self.images(model, img_size)
            net = self._applied(model, img_size, method, params, weights)
            with torch.inference_mode():
                net(images)
            st = last_state(method_net(net))
            per = st.tokens_per_image()
            rows = per.tolist() if per is not None else [list(st.tokens)] * len(images)
            # tokens entering a block's MLP: those entering the next block (the last: its own)
            costs = [analytic_block_cost(base, (row, row[1:] + row[-1:])) for row in rows]
            fixed_part = self.dense(model, img_size) - a_dense / 1e9
            self._estimates[key] = fixed_part + sum(costs) / len(costs) / 1e9
        return self._estimates[key]

    @staticmethod
    def _validated(method: str, params: dict) -> dict:
        from ..registry import get_method

        return get_method(method).validate(params)

    def count(self, model: str, img_size: Optional[int], method: str, params: dict,
              weights: tuple = (False, None)) -> float:
        """fvcore GFLOPs of ``model`` with ``method(params)`` applied (cached).  A method whose
        token count depends on the image is counted on the :attr:`data` images with the run's
        ``weights`` (the mean per image), where the searcher has data."""
        from ..registry import get_method

        params = get_method(method).validate(params)
        if self.data is not None and self.per_image(model, img_size, method, params):
            return self._count_on_data(model, img_size, method, params, weights)

        def fvcore_count() -> float:
            return gflops_of(apply_to(copy.deepcopy(self.base(model, img_size)[0]), method, params), img_size)

        return self._counted(self._key(model, img_size, method, params), fvcore_count)

    def _count_on_data(self, model, img_size, method, params, weights) -> float:
        def fvcore_count() -> float:
            return gflops_of(self._applied(model, img_size, method, params, weights), img_size,
                             inputs=self.images(model, img_size))

        return self._counted(self._key(model, img_size, method, params, self._on_data_key(model, weights)),
                             fvcore_count)

    def _counted(self, key: str, count: Callable[[], float]) -> float:
        """The cached count under ``key``; else ``count()``, made on one thread (tracing is
        Python-bound; more threads only contend), then cached, saved and reported."""
        if key not in self.cache:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self.cache[key] = float(count())
            finally:
                torch.set_num_threads(threads)
            self.counts += 1
            self.save()
            if self.on_count:
                self.on_count(self.counts)
        return self.cache[key]

    def dense(self, model: str, img_size: Optional[int]) -> float:
        return self.count(model, img_size, DENSE_METHOD, {})

    def save(self) -> None:
        if self.cache_path is None:
            return
        from ..store import atomic_write_text

        # Another sweep may be writing the same cache: keep its counts too (each write is
        # atomic, so the file is always whole; at worst a concurrent count is made twice).
        merged = dict(self._read_cache())
        merged.update(self.cache)
        try:
            atomic_write_text(self.cache_path, json.dumps({"about": "fvcore GFLOPs per architecture, method and "
                                                           "parameters (tokenbench matched-FLOPs search cache)",
                                                           "gflops": merged}, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a cache, not a result

    def _read_cache(self, path: Optional[Path] = None) -> dict[str, float]:
        path = path or self.cache_path
        if not (path and path.is_file()):
            return {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("gflops"), dict):
                return {k: float(v) for k, v in data["gflops"].items()}
        except (OSError, ValueError, TypeError):
            import warnings

            if str(path) not in self._damaged:  # read again when saving: say it once
                self._damaged.add(str(path))
                warnings.warn(f"FLOPs cache {path} is damaged; counting again")
        return {}

    # ----------------------------------------------------------- candidates
    def candidates(self, model: str, img_size: Optional[int], cls, fixed: dict, param: str
                   ) -> Optional[list[tuple[Any, tuple]]]:
        """(value, token schedule) for every distinct schedule, or None without a declared schedule."""
        from ..store import canonical

        memo_key = canonical([model, img_size, cls.name, fixed, param])
        if memo_key not in self._cands:
            self._cands[memo_key] = self._candidates(model, img_size, cls, fixed, param)
        return self._cands[memo_key]

    def _candidates(self, model, img_size, cls, fixed, param):
        net = method_net(self.base(model, img_size)[0])
        inst = cls()
        p = cls.param(param)

        def schedule(v):
            try:
                out = inst.expected_tokens(net, **cls.validate({**fixed, param: v}))
            except UserError:
                return "invalid"
            if out is None:
                return None
            return tuple(tuple(float(t) for t in seq) for seq in out)

        seen: dict[tuple, Any] = {}
        if p.type == "float":
            lo = 0.0 if p.min is None else float(p.min)
            hi = 1.0 if p.max is None else float(p.max)
            for step in (0.01, 0.005, 0.001):
                n = int(round((hi - lo) / step))
                for i in range(n + 1):
                    v = round(lo + i * step, 6)
                    if v < lo or v > hi or (p.min_exclusive and v == lo):
                        continue
                    s = schedule(v)
                    if s is None:
                        return None
                    if s != "invalid" and s not in seen:
                        seen[s] = v
        elif p.type in ("int", "int_or_list"):
            lo = 0 if p.min is None else int(math.ceil(p.min))
            hi = int(p.max) if p.max is not None else 4096
            depth = model_depth(net)
            prev, same = None, 0
            for n in range(lo, hi + 1):
                s = schedule(n)
                if s is None:
                    return None
                if s == "invalid":
                    continue
                if s not in seen:
                    seen[s] = n
                if p.type == "int_or_list" and depth > 1 and n + 1 <= hi:
                    for k in range(1, depth):
                        v = [n + 1] * k + [n] * (depth - k)
                        sv = schedule(v)
                        if sv not in ("invalid", None) and sv not in seen:
                            seen[sv] = v
                same = same + 1 if s == prev else 0
                prev = s
                if same >= 2:  # saturated: larger values change nothing
                    break
        else:
            return None
        return [(v, s) for s, v in seen.items()]

    # ----------------------------------------------------------- the search
    def search(self, model: str, img_size: Optional[int], cls, fixed: dict, param: str, target: float,
               tolerance: float = DEFAULT_TOLERANCE, preferred: Iterable[Any] = (),
               weights: tuple = (False, None)) -> SearchResult:
        """The value of ``param`` (others ``fixed``) closest to ``target`` x dense FLOPs.

        ``preferred`` values (those with a checkpoint) win whenever one lands within ``tolerance``.
        A method whose token count depends on the image is counted on the :attr:`data` images
        with the run's ``weights`` (pretrained, checkpoint); without data, on the random input,
        with a warning.
        """
        from .. import inputs

        dense = self.dense(model, img_size)
        goal = target * dense
        before = self.counts

        def cnt(v) -> float:
            return self.count(model, img_size, cls.name, {**fixed, param: v}, weights)

        counted: dict[str, tuple[Any, float]] = {}
        per_image = self.per_image(model, img_size, cls.name, fixed)
        on_data = per_image and self.data is not None
        cands = None if on_data else self.candidates(model, img_size, cls, fixed, param)
        net, _ = self.base(model, img_size)
        est = None
        if cands:
            dense_sched = dense_schedule(net)
            a_dense = analytic_block_cost(net, dense_sched) if dense_sched else None
            if a_dense is not None:
                fixed_part = dense - a_dense / 1e9
                est = [fixed_part + analytic_block_cost(net, s) / 1e9 for _, s in cands]
        if on_data:
            self._search_on_data(model, img_size, cls, fixed, param, goal, dense, tolerance, weights, cnt, counted)
        elif cands and est is not None:
            fit = _Refit()
            order_tried: set[int] = set()
            for _ in range(6):
                i = min(range(len(cands)), key=lambda j: (abs(fit(est[j]) - goal), j))
                if i in order_tried:
                    break
                order_tried.add(i)
                g = cnt(cands[i][0])
                counted[json.dumps(cands[i][0])] = (cands[i][0], g)
                fit.add(est[i], g, goal)
            # the bracketing neighbours of the goal under the refit cost
            below = [j for j in range(len(cands)) if fit(est[j]) <= goal]
            above = [j for j in range(len(cands)) if fit(est[j]) >= goal]
            for group, pick in ((below, max), (above, min)):
                if group:
                    j = pick(group, key=lambda j: (est[j], -j))
                    counted.setdefault(json.dumps(cands[j][0]), (cands[j][0], cnt(cands[j][0])))
        else:
            self._bisect(cls, param, goal, cnt, counted, close=0.1 * tolerance * dense)
        pref = {json.dumps(cls.param(param).parse(v, cls.name)): v for v in preferred}
        for k, v in pref.items():
            counted.setdefault(k, (v, cnt(v)))
        # the closest count; but a checkpointed value wins whenever one lands within the tolerance
        pool = [k for k, (_, g) in counted.items() if k in pref and abs(g / dense - target) <= tolerance]
        pool = pool or list(counted)
        best_key = min(pool, key=lambda k: (abs(counted[k][1] - goal), k))
        value, g = counted[best_key]
        ratio = g / dense
        res = SearchResult(value=value, gflops=g, dense_gflops=dense, target=target, ratio=ratio,
                           miss=abs(ratio - target) > tolerance + 1e-12, checkpointed=best_key in pref,
                           counted=self.counts - before)
        if on_data:
            res.input = self.data.described()
        elif per_image:
            res.input, res.warning = inputs.described(n=1), inputs.SYNTHETIC_FLOPS
        elif res.miss and cands:  # ranked by the declared schedule: is it the one the forward keeps?
            res.warning = self.schedule_diagnosis(model, img_size, cls, {**fixed, param: value})
        return res

    def schedule_diagnosis(self, model: str, img_size: Optional[int], cls, params: dict) -> Optional[str]:
        """The method's declared token schedule against its traced forward at ``params`` (one trace)."""
        from ..measure import flop_count
        from ..checks import schedule_disagreement
        from ..registry import apply

        params = cls.validate(params)
        net = copy.deepcopy(self.base(model, img_size)[0])
        if method_net(net) is not net:  # a dense model: its FLOPs miss is reported as it is
            return None
        apply(net, cls.name, **params)
        traced = flop_count.flops(net, img_size=img_size)
        try:
            declared = cls().expected_tokens(net, **params)
        except UserError:
            return None
        return schedule_disagreement(declared, traced.get("tokens"), traced.get("tokens_mlp"))

    def _search_on_data(self, model, img_size, cls, fixed, param, goal, dense, tolerance, weights, cnt,
                        counted) -> None:
        """A per-image method on the data images: bisect on the cost model's estimate
        (:meth:`estimate`, one batched forward per value), count the answer with fvcore (one trace
        per image), correct the estimate by the ratio of the two and look again, until fvcore lands
        within a third of the tolerance or the answer repeats (at most 4 fvcore counts).  Without a
        cost model: bisection on fvcore counts."""
        def est(v):
            return self.estimate(model, img_size, cls.name, {**fixed, param: v}, weights)

        if est(cls.param(param).default) is None:
            self._bisect(cls, param, goal, cnt, counted, close=0.1 * tolerance * dense)
            return
        scale = 1.0
        for _ in range(4):
            seen: dict[str, tuple[Any, float]] = {}
            self._bisect(cls, param, goal / scale, est, seen)
            value = min(seen.values(), key=lambda vg: (abs(vg[1] - goal / scale), json.dumps(vg[0])))[0]
            k = json.dumps(value)
            if k in counted:
                break
            g = cnt(value)
            counted[k] = (value, g)
            if abs(g - goal) <= tolerance * dense / 3:
                break
            scale = g / est(value)

    def _bisect(self, cls, param: str, goal: float, cnt: Callable, counted: dict, close: float = 0.0) -> None:
        """Bisection on fvcore counts (FLOPs assumed monotone in the parameter); stops within ``close``."""
        p = cls.param(param)
        if p.type == "float":
            lo = (0.0 if p.min is None else float(p.min))
            hi = 1.0 if p.max is None else float(p.max)
            if p.min_exclusive:
                lo = lo + min(1e-3, (hi - lo) / 1000)
            a, b = lo, hi
            gb = cnt(round(b, 4))
            for k in range(10):  # the low end may be refused on some models (hierarchical keep_rate > 0.4)
                a = round(lo + (hi - lo) * k / 10, 4)
                try:
                    ga = cnt(a)
                    break
                except UserError:
                    if k == 9:
                        raise
            counted[json.dumps(round(a, 4))] = (round(a, 4), ga)
            counted[json.dumps(round(b, 4))] = (round(b, 4), gb)
            increasing = gb >= ga
            for _ in range(12):
                m = round((a + b) / 2, 4)
                if m in (round(a, 4), round(b, 4)):
                    break
                gm = cnt(m)
                counted[json.dumps(m)] = (m, gm)
                if abs(gm - goal) <= close:
                    break
                if (gm < goal) == increasing:
                    a = m
                else:
                    b = m
        elif p.type in ("int", "int_or_list"):
            lo = 0 if p.min is None else int(math.ceil(p.min))
            hi = lo + 1
            g_lo = cnt(lo)
            counted[json.dumps(lo)] = (lo, g_lo)
            g_prev = g_lo
            while hi < (int(p.max) if p.max is not None else 4096):  # find where FLOPs stop changing
                g_hi = cnt(hi)
                counted[json.dumps(hi)] = (hi, g_hi)
                if g_hi == g_prev or (g_hi - goal) * (g_lo - goal) <= 0:
                    break
                g_prev, hi = g_hi, hi * 2
            a, b = lo, hi
            increasing = counted[json.dumps(b)][1] >= g_lo
            while b - a > 1:
                m = (a + b) // 2
                gm = cnt(m)
                counted[json.dumps(m)] = (m, gm)
                if (gm < goal) == increasing:
                    a = m
                else:
                    b = m
        else:
            raise UserError(f"{cls.name}: cannot search parameter {param!r} of type {p.type}")
