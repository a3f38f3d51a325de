"""Where and with what a figure is measured: the CPU, the device asked for, the threads this
process may use, the library versions, the CUDA settings that change a GPU figure, and which
attention kernel the model runs."""

from __future__ import annotations

import os
import platform
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import UserError


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_threads() -> int:
    """The CPUs this process may use (its affinity; a container or `taskset` may allow fewer
    than ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tf32_matmul() -> bool:
    """Whether fp32 matmuls on CUDA may run in TensorFloat-32 (torch's switch or its matmul
    precision set below "highest"; off by default)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but CUDA is not available on this machine (use --device cpu)")
        return torch.device(device)
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("--device mps requested but MPS is not available on this machine")
        return torch.device("mps")
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {device!r} (use auto, cpu or cuda)")


def env_info(device: torch.device | str = "cpu", threads: Optional[int] = None) -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import timm

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": default_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["device_name"] = info["gpu"]
        info.update(gpu_settings())
    else:
        info["device_name"] = info["cpu"]
    try:
        info["load_avg"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_avg"] = None
    return info


def gpu_settings() -> dict[str, Any]:
    """The CUDA settings that change a GPU figure: TF32 / float32 matmul precision, cuDNN
    benchmark mode, and which fused-attention kernels PyTorch may pick."""
    out: dict[str, Any] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
    sdp = {}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        fn = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        if fn is not None:
            sdp[name] = bool(fn())
    out["sdpa_enabled"] = sdp
    return out


def timm_attention() -> str:
    """The attention timm builds its models with, from its process-wide switch: ``"sdpa"`` (on, the
    default), ``"explicit"`` (off: ``TIMM_FUSED_ATTN=0`` or ``timm.layers.set_fused_attn(False)``)
    or ``"sdpa-experimental"`` (``TIMM_FUSED_ATTN=2``: also the models timm fuses only on request)."""
    from timm.layers import use_fused_attn

    if not use_fused_attn():
        return "explicit"
    return "sdpa-experimental" if use_fused_attn(experimental=True) else "sdpa"


def attention_kernel(model: nn.Module) -> str:
    """Which attention the model's blocks run: ``"sdpa"`` (fused scaled-dot-product attention)
    or ``"explicit"`` (softmax of the full matrix), from timm's switch ``fused_attn``, which
    timm's own forward and the ViT backbone's surgery (``tokenbench.backbones.vit.attention``) both honour;
    ``"mixed"`` where blocks differ."""
    fused = {bool(getattr(m, "fused_attn")) for m in model.modules() if hasattr(m, "fused_attn")}
    if not fused:
        return "n/a"
    return "sdpa" if fused == {True} else ("explicit" if fused == {False} else "mixed")
