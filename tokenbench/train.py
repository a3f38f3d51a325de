"""Training loops: the embedded model from scratch, and fine-tuning with a method.

One loop serves both.  Everything random is a function of ``(seed, step)`` (the
epoch's shuffle of ``(seed, epoch)``), so a run killed at any point and resumed from
its last checkpoint continues on the same images with the same augmentation.

A run directory holds ``last.pt`` (model, optimiser, step; rewritten atomically every
``ckpt_every`` steps), ``train_log.csv`` (one row per evaluation), ``config.json``
and, when finished, ``model.pt`` with ``model.pt.sha256``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .registry import LossFn
from .store import atomic_write_bytes, atomic_write_text, sha256_file
from .train_data import TensorSource, build_source, check_data, fmnist_tensors


@dataclass
class TrainConfig:
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 300
    label_smoothing: float = 0.1
    seed: int = 0
    # augmentation (batched, on tensors)
    shift: int = 3            # random translation, pixels (zero padded)
    hflip: bool = True
    erase_p: float = 0.25     # random erasing probability
    eval_every: int = 0       # steps between test evaluations (0: once per epoch)
    ckpt_every: int = 200     # steps between resumable checkpoints
    eval_limit: Optional[int] = None  # test images used at intermediate evaluations (None: all)
    threads: Optional[int] = None
    max_steps: Optional[int] = None   # steps of this invocation (a resumed run goes that much further); the schedule still follows `epochs`
    grad_clip: Optional[float] = None
    device: str = "cpu"
    # fine-tuning: learning-rate multiplier of the pretrained backbone and epochs it stays
    # frozen, for methods whose optimiser groups say which parameters are new (None: the
    # method's own defaults, scaled to the run's length)
    backbone_lr_scale: Optional[float] = None
    fix_epochs: Optional[float] = None
    # DataLoader workers for image-folder data (None: min(8, CPU count)); results do not
    # depend on it, so a run may resume with another value
    num_workers: Optional[int] = None


# --------------------------------------------------------------------------- schedule and optimiser groups

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: nn.Module, weight_decay: float):
    """No weight decay on biases, norms, tokens and position embeddings (timm's rule)."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or n in skip or n.endswith(".bias") or "pos_embed" in n or "cls_token" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- the loop



def cross_entropy_loss(label_smoothing: float) -> LossFn:
    def f(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits, {}
    return f


def _save_resumable(path: Path, model, opt, step: int, extra: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, **extra}, buf)
    atomic_write_bytes(path, buf.getvalue())


RUN_FILES = ("model.pt", "model.pt.sha256", "last.pt", "train_log.csv", "config.json")


def is_finished_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a finished run (its final ``model.pt``)."""
    out_dir = Path(out_dir)
    return (out_dir / "model.pt").is_file() or (out_dir / "model.pt.sha256").is_file()


def check_run_dir(out_dir: Path, force: bool = False, reschedule: bool = False) -> None:
    """Refuse a finished run as the output of a training unless ``force`` (cheap; call it first).

    A finished run's files (``model.pt``, its log and config) belong together: training again
    into it, or an interruption of that, would leave them inconsistent.  An unfinished run
    (``last.pt``, no ``model.pt``) is fine: it resumes.  With ``reschedule`` a finished run that
    kept its ``last.pt`` may be lengthened (:func:`train_loop` checks the new length).
    """
    if not is_finished_run(out_dir) or force:
        return
    if reschedule:
        if (Path(out_dir) / "last.pt").is_file():
            return
        raise UserError(f"{out_dir} holds a finished run without its last checkpoint (last.pt), so it cannot be "
                        "lengthened; choose another --out, or add --force to train again from scratch there")
    raise UserError(f"{out_dir} holds a finished run (model.pt); choose another --out, "
                    "add --reschedule --epochs N to train it longer, or --force to train again from scratch there")


def claim_run_dir(out_dir: Path, force: bool = False, reschedule: bool = False) -> None:
    """:func:`check_run_dir`, and with ``force`` clear a finished run's files to start it over."""
    out_dir = Path(out_dir)
    check_run_dir(out_dir, force, reschedule)
    if not is_finished_run(out_dir) or not force:
        return
    for name in RUN_FILES:
        try:
            (out_dir / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"cannot clear {out_dir / name}: {e.strerror}") from None


class _StopAtStepEnd:
    """Ctrl-C (SIGINT) during training stops at the end of the current step, after a checkpoint.

    A second Ctrl-C interrupts at once.  Outside the main thread (no signal handlers there)
    it does nothing and Ctrl-C interrupts as usual.
    """

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:  # the second Ctrl-C
            signal.signal(signal.SIGINT, self._old or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train_loop(model: nn.Module, train_x, train_y: Optional[torch.Tensor] = None, test_x: Optional[torch.Tensor] = None,
               test_y: Optional[torch.Tensor] = None, cfg: Optional[TrainConfig] = None, out_dir: Optional[Path] = None,
               loss_fn: Optional[LossFn] = None,
               eval_model: Optional[Callable[[], nn.Module]] = None, config_extra: Optional[dict] = None,
               progress: bool = True, log_extra_cols: tuple[str, ...] = (),
               groups: Optional[list] = None, step_hook: Optional[Callable[[nn.Module, float], None]] = None,
               reschedule: bool = False, force: bool = False) -> dict:
    """Train ``model`` resumably into ``out_dir``.

    The data is either in-memory preprocessed tensors ``train_x, train_y, test_x, test_y``
    or a batch source (:mod:`tokenbench.train_data`) in place of ``train_x``, with the
    three tensors left out: ``train_loop(model, source, cfg=cfg, out_dir=out)``.
    Returns a summary with the final test accuracy.  ``loss_fn`` is a
    :data:`~tokenbench.registry.LossFn`; the default is label-smoothed cross-entropy.  A finished
    run in ``out_dir`` is refused unless ``force`` (which starts it over); Ctrl-C saves a
    checkpoint at the end of the current step, so that the same call resumes from there.
    """
    if cfg is None or out_dir is None:
        raise TypeError("train_loop() needs cfg and out_dir")
    source = _source_of(train_x, train_y, test_x, test_y)
    out_dir = Path(out_dir)
    steps_per_epoch = source.n // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {source.n} images, fewer than one batch of {cfg.batch_size}")
    total = int(round(cfg.epochs * steps_per_epoch))
    if total == 0:  # refused before the run directory is touched
        raise UserError(f"{cfg.epochs:g} epochs of {steps_per_epoch} steps round to no training step; "
                        "give more --epochs")
    _claim_out_dir(out_dir, force, reschedule)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    eval_every = cfg.eval_every or steps_per_epoch
    config = {"train": asdict(cfg), "total_steps": total, "steps_per_epoch": steps_per_epoch,
              **source.describe(), **(config_extra or {})}
    lengthen = is_finished_run(out_dir) and not force  # --reschedule on a finished run (check_run_dir let it through)
    if lengthen:
        _check_longer(out_dir, total)
    _write_config(out_dir, config, reschedule)
    if lengthen:  # its final weights go; the lengthened run writes them at its end
        for name in ("model.pt", "model.pt.sha256"):
            (out_dir / name).unlink(missing_ok=True)

    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    model.to(dev)
    opt, scales, fixes = _optimizer(model, groups, cfg)
    last = out_dir / "last.pt"
    step, elapsed0 = _resume(last, model, opt)
    # --max-steps counts this invocation's steps, so rerunning the same command continues
    stop_at = min(total, step + cfg.max_steps) if cfg.max_steps else total
    if progress and step > 0:
        print(f"resuming {out_dir} at step {step} of {total}; stopping at step {stop_at}"
              + (f" (--max-steps {cfg.max_steps})" if cfg.max_steps else ""), file=sys.stderr)
    log = _TrainLog(out_dir / "train_log.csv", log_extra_cols, step)

    model.train()
    t0 = time.time()
    summary = {"steps": total, "resumed_from": step}
    prog = _progress_bar(progress)
    with prog, _StopAtStepEnd() as interrupt:
        task = prog.add_task("train", total=stop_at, completed=step, info="")
        batches = source.batches(step, stop_at, steps_per_epoch, cfg)
        while step < stop_at:
            x, y = (t.to(dev, non_blocking=True) for t in next(batches))
            torch.manual_seed(cfg.seed * 7919 + step)  # dropout / Gumbel noise inside the model
            lr, ep = lr_at(step, total, cfg), step / steps_per_epoch
            for grp, sc, fx in zip(opt.param_groups, scales, fixes):  # a group waits `fix_epochs` at lr 0
                grp["lr"] = 0.0 if ep < fx else lr * sc
            if step_hook is not None:
                step_hook(model, ep)
            loss, logits, metrics = _optimise(model, opt, loss_fn, x, y, cfg.grad_clip, step)
            step += 1
            log.add(loss, logits, y, metrics)
            prog.update(task, completed=step, info=f"ep {step / steps_per_epoch:.2f} {log.brief()}")
            if step % eval_every == 0 or step == stop_at:
                limit = cfg.eval_limit if cfg.eval_limit and step != total else None
                summary["test_acc"] = acc = source.evaluate(eval_model() if eval_model else model, dev, limit)
                log.write(step, steps_per_epoch, lr, acc, elapsed0 + time.time() - t0)
                prog.console.print(f"step {step}/{total}  {log.summary_line(acc)}")
                log.reset()
            if step % cfg.ckpt_every == 0 or step == stop_at or step % eval_every == 0 or interrupt.requested:
                _save_resumable(last, model, opt, step, {"config": config, "elapsed": elapsed0 + time.time() - t0})
            if interrupt.requested:
                batches.close()
                prog.console.print(f"interrupted: saved step {step}/{total} to {last}; rerun the same command to resume")
                raise KeyboardInterrupt
        batches.close()  # DataLoader workers, if any, end here
    summary.update(finished=step >= total, step=step)
    if step >= total:
        finalize(model, out_dir)
    return summary


def _optimizer(model: nn.Module, groups: Optional[list], cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list, list]:
    """AdamW over ``groups`` (default: :func:`param_groups`), with each group's learning-rate scale and
    the epochs it stays frozen (``lr_scale``, ``fix_epochs``, taken out of the groups)."""
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    scales = [float(g.pop("lr_scale", 1.0)) for g in groups]
    fixes = [float(g.pop("fix_epochs", 0.0)) for g in groups]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999)), scales, fixes


def _source_of(train_x, train_y: Optional[torch.Tensor], test_x: Optional[torch.Tensor],
               test_y: Optional[torch.Tensor]):
    """The batch source: four in-memory tensors wrapped, or a source given in place of ``train_x``."""
    if isinstance(train_x, torch.Tensor):
        return TensorSource(train_x, train_y, test_x, test_y)
    if train_y is not None or test_x is not None or test_y is not None:
        raise TypeError("train_loop() takes either four tensors or one batch source")
    return train_x


def _claim_out_dir(out_dir: Path, force: bool, reschedule: bool = False) -> None:
    """``out_dir`` claimed for this run, created and writable (one line of error otherwise)."""
    claim_run_dir(out_dir, force, reschedule)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable")


def _write_config(out_dir: Path, config: dict, reschedule: bool) -> None:
    """``config.json``; a run already there must have the same configuration (with ``reschedule``,
    only its length may change, and the change is kept in the config's history)."""
    cfg_path = out_dir / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        free = {"max_steps": None, "num_workers": None, "threads": None}  # may change when a run resumes
        new_train = config["train"] | free
        # fields added to the config since that run started take their (behaviour-preserving) defaults
        old_train = {k: old.get("train", {}).get(k, v) for k, v in new_train.items()} | free
        history = old.get("rescheduled", [])
        # what the run is (model, method and its settings, data, initial and teacher weights, loss
        # weights): a resume trains on with the run's own, so other ones are refused, never mixed in
        derived = ("train", "total_steps", "steps_per_epoch", "data_dir", "rescheduled")
        as_saved = json.loads(json.dumps(config, default=str))  # tuples as lists, as config.json holds them
        other = [k for k in as_saved if k not in derived and old.get(k, as_saved[k]) != as_saved[k]]
        if other:
            k = other[0]
            raise UserError(f"{out_dir} holds a run with {k} {_one_line(old[k])}, not {_one_line(as_saved[k])}: rerun with "
                            "its settings to resume it, or use another --out (or --force to start over)")
        if old_train != new_train:
            only_epochs = (old_train | {"epochs": None}) == (new_train | {"epochs": None})
            if not (reschedule and only_epochs):
                k = next(k for k in new_train if old_train.get(k) != new_train[k])
                raise UserError(f"{out_dir} holds a run with a different configuration ({k} {_one_line(old_train.get(k))}, "
                                f"not {_one_line(new_train[k])}); use another --out or delete it"
                                + (" (or --reschedule to change only its length)" if only_epochs else ""))
            history = history + [{"from_epochs": old_train["epochs"], "to_epochs": new_train["epochs"],
                                  "at_step": _last_step(out_dir / "last.pt")}]
        if history:
            config["rescheduled"] = history
    atomic_write_text(cfg_path, json.dumps(config, indent=2, default=str))


def _one_line(value) -> str:
    """A config value in one short line."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_longer(out_dir: Path, total: int) -> None:
    """A finished run is lengthened only: a schedule of ``total`` steps must go past its last step."""
    done = _last_step(out_dir / "last.pt")
    if total <= done:
        raise UserError(f"{out_dir} finished at step {done}; --reschedule can only lengthen a finished run "
                        f"(the new length is {total} steps)")


def _resume(last: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """(step, seconds trained) of the checkpoint ``last``, loaded into ``model`` and ``opt``; (0, 0)
    without one."""
    if not last.is_file():
        return 0, 0.0
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        return int(state["step"]), float(state.get("elapsed", 0.0))
    except Exception as e:
        raise UserError(f"cannot resume from {last} ({e.__class__.__name__}); delete it to start over") from None


def _optimise(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
              grad_clip: Optional[float], step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimiser step on the batch; the loss's (loss, logits, metrics)."""
    loss, logits, metrics = loss_fn(model, x, y)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss, logits, metrics


def _progress_bar(progress: bool):
    """The training bar; it and the per-evaluation lines go to stderr (stdout carries the summary,
    one JSON object with --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not progress, transient=False, console=Console(stderr=True))


class _TrainLog:
    """``train_log.csv``: one row per evaluation, with the loss, accuracy and the loss's metrics
    averaged over the steps since the previous row."""

    def __init__(self, path: Path, extra_cols: tuple[str, ...], step: int) -> None:
        self.path, self.extra_cols = path, extra_cols
        cols = ["step", "epoch", "lr", "train_loss", "train_acc", "test_acc", "elapsed_s", *extra_cols]
        if not path.is_file() or step == 0:
            atomic_write_text(path, ",".join(cols) + "\n")
        else:  # drop log rows past the checkpoint we resume from
            rows = path.read_text().splitlines()
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r.split(",")[0]) <= step]
            atomic_write_text(path, "\n".join(keep) + "\n")
        self.reset()

    def reset(self) -> None:
        self.loss, self.correct, self.n = 0.0, 0.0, 0
        self.metrics: dict[str, float] = {}

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, metrics: dict[str, float]) -> None:
        self.loss += loss.item() * len(y)
        # per-image share of correct predictions (one for a class label, a fraction of pixels for a mask)
        hits = logits.argmax(1 if logits.dim() > 2 else -1) == y
        self.correct += float(hits.float().reshape(len(y), -1).mean(1).sum())
        self.n += len(y)
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v) * len(y)

    def brief(self) -> str:
        return f"loss {self.loss / self.n:.3f} acc {100 * self.correct / self.n:.1f}"

    def summary_line(self, acc: float) -> str:
        n = max(1, self.n)
        return f"loss {self.loss / n:.4f}  train {100 * self.correct / n:.2f}%  test {acc:.2f}%"

    def write(self, step: int, steps_per_epoch: int, lr: float, acc: float, elapsed: float) -> None:
        n = max(1, self.n)
        row = [step, f"{step / steps_per_epoch:.3f}", f"{lr:.3e}", f"{self.loss / n:.4f}",
               f"{100 * self.correct / n:.2f}", f"{acc:.2f}", f"{elapsed:.0f}"]
        row += [f"{self.metrics.get(k, 0.0) / n:.4f}" for k in self.extra_cols]
        with open(self.path, "a") as f:
            f.write(",".join(str(v) for v in row) + "\n")


def _last_step(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:
        return 0


def finalize(model: nn.Module, out_dir: Path) -> str:
    """Write ``model.pt`` (weights only) and its SHA-256 beside it."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out_dir / "model.pt", buf.getvalue())
    sha = sha256_file(out_dir / "model.pt")
    atomic_write_text(out_dir / "model.pt.sha256", f"{sha}  model.pt\n")
    return sha


# --------------------------------------------------------------------------- base model

BASE_RECIPE = TrainConfig(epochs=8, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=400,
                          label_smoothing=0.1, shift=3, hflip=True, erase_p=0.25, ckpt_every=200,
                          eval_limit=2000, grad_clip=1.0)
# The hierarchical embedded model (default-convnext): a convolutional network converges in fewer
# epochs and with lighter augmentation (less random erasing) than the ViT; 15 epochs take about
# 85 minutes on one core here.
CONVNEXT_RECIPE = TrainConfig(epochs=15, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=400,
                              label_smoothing=0.1, shift=3, hflip=True, erase_p=0.1, ckpt_every=200,
                              eval_limit=2000, grad_clip=1.0)
# default-small trains with the embedded ViT's recipe unchanged.
BASE_RECIPES = {"default": BASE_RECIPE, "default-convnext": CONVNEXT_RECIPE, "default-small": BASE_RECIPE}


def train_base(out_dir: Path, cfg: Optional[TrainConfig] = None, data_dir=None, arch: Optional[dict] = None,
               limit: Optional[int] = None, progress: bool = True, reschedule: bool = False,
               force: bool = False, model: str = "default") -> dict:
    """Train embedded model ``model`` (``default``, ``default-small`` or ``default-convnext``) from scratch on
    Fashion-MNIST into ``out_dir``."""
    from .models import build_embedded, embedded_arch

    check_run_dir(out_dir, force, reschedule)

    cfg = cfg or BASE_RECIPES[model]
    torch.manual_seed(cfg.seed)
    a = embedded_arch(model)
    a.update(arch or {})
    model = build_embedded(a)
    tx, ty, vx, vy = fmnist_tensors(data_dir)
    if limit:
        tx, ty = tx[:limit], ty[:limit]
    return train_loop(model, tx, ty, vx, vy, cfg, out_dir, config_extra={"arch": a, "data": "fashion-mnist"},
                      progress=progress, reschedule=reschedule, force=force)


# --------------------------------------------------------------------------- fine-tuning with a method

FINETUNE_RECIPE = TrainConfig(epochs=3, batch_size=128, lr=1e-3, min_lr=1e-6, weight_decay=0.05, warmup_steps=100,
                              label_smoothing=0.1, shift=3, hflip=True, erase_p=0.25, ckpt_every=100,
                              eval_limit=2000)


def finetune(model: str, method: str, params: dict, out_dir: Path, cfg: Optional[TrainConfig] = None,
             data: str = "fashion-mnist", data_dir=None, checkpoint: Optional[str] = None,
             teacher_checkpoint: Optional[str] = None, pretrained: bool = False,
             loss_weights: Optional[dict] = None, progress: bool = True, force: bool = False,
             reschedule: bool = False) -> dict:
    """Fine-tune ``model`` with ``method`` applied, with the method's own training behaviour.

    The method may provide ``train_setup(model, teacher, params, weights) -> LossFn``
    (DynamicViT: Gumbel decisions, masked attention, ratio and distillation losses
    against the frozen dense ``teacher``), ``param_groups(model, wd, backbone_lr_scale)``
    (new parts at the full rate, the pretrained backbone scaled down and frozen at first)
    and ``train_step(model, params, epoch)`` (schedules such as EViT's keep-rate warm-up).
    Without them: cross-entropy on the reduced model, every weight at
    ``lr * backbone_lr_scale``.

    ``data``: ``fashion-mnist`` (in memory, batched tensor augmentation), ``imagenet`` /
    ``folder`` (``<data_dir>/train`` and ``<data_dir>/val`` class folders, loaded by a
    DataLoader with ``cfg.num_workers`` workers; training images get DeiT's augmentation
    *without its mixup/cutmix*: see :class:`tokenbench.train_data.FolderSource`) or
    ``synthetic`` (random images of the model's input size, fixed seeds; smoke runs).
    """
    from .api import load
    from .data import DATASETS
    from .errors import did_you_mean
    from .registry import get_method

    cfg = cfg or FINETUNE_RECIPE
    check_run_dir(out_dir, force, reschedule)
    if data not in DATASETS:
        raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; choose from {', '.join(DATASETS)}")
    check_data(data, data_dir)  # before any model is built
    cls = get_method(method)
    meth = cls()
    p, train_p = cls.validate_training(params)
    torch.manual_seed(cfg.seed)
    student, prov = load(model, method, p, pretrained=pretrained, checkpoint=checkpoint)
    student.train()
    teacher, tprov = load(model, "none", {}, pretrained=pretrained, checkpoint=teacher_checkpoint)
    teacher.eval().requires_grad_(False)
    teacher.to(cfg.device)
    loss_fn = meth.train_setup(student, teacher, {**p, **train_p}, loss_weights)
    if loss_fn is None and loss_weights:
        raise UserError(f"{method} has no loss weights to set")
    scale = cfg.backbone_lr_scale
    groups = meth.param_groups(student, cfg.weight_decay, **({} if scale is None else {"backbone_lr_scale": scale}))
    if groups is not None:
        for g in groups:
            if g.get("fix_epochs", 0) > 0:
                g["fix_epochs"] = cfg.fix_epochs if cfg.fix_epochs is not None else min(g["fix_epochs"], cfg.epochs / 6)
    else:
        groups = param_groups(student, cfg.weight_decay)
        for g in groups:
            g["lr_scale"] = 0.1 if scale is None else scale
            g["fix_epochs"] = 0.0
    hook = lambda m, ep: meth.train_step(m, {**p, **train_p}, ep)  # noqa: E731
    source = build_source(data, data_dir, student, cfg)
    extra = {"model": model, "method": method, "params": p, **({"train_params": train_p} if train_p else {}), "data": data, "init": prov.get("weights"),
             "teacher": tprov.get("weights"), "loss_weights": loss_weights or {}, "pretrained": pretrained}
    cols = tuple(getattr(loss_fn, "metric_names", ()))
    return train_loop(student, source, cfg=cfg, out_dir=out_dir, loss_fn=loss_fn, config_extra=extra,
                      progress=progress, log_extra_cols=cols, groups=groups, step_hook=hook, force=force,
                      reschedule=reschedule)
