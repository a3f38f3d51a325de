"""CUDA graphs as a timing mode: the eager forward captured once per static shape, then replayed.

What a deployer does to take the host's launch overhead out of a GPU forward without
``torch.compile``'s minutes of compiling: the forward's kernels are recorded once into a
``torch.cuda.CUDAGraph`` (after a warm-up on a side stream, as PyTorch's documentation asks)
and every later call replays them with one launch.  The input tensor is the graph's static
input: calling with the same tensor replays at once; another tensor of the same shape is
copied into it first.  A forward that reads tensor values on the host (a token count that
depends on the image, taken with ``.item()`` or ``nonzero``) cannot be captured; that is
refused in one line naming the reason.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError

NOT_CAPTURABLE = ("its token count depends on the image and is read on the host, so its forward "
                  "cannot be captured as one CUDA graph; time it eager or compiled")


def check_device(dev: torch.device) -> None:
    """CUDA graphs exist on CUDA only: anything else is refused in one line."""
    if dev.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device; this run is on {dev.type} "
                        "(time eager or --compile there)")


def replayer(run: Callable[[torch.Tensor], torch.Tensor], dev: torch.device,
             warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run`` captured as a CUDA graph per static input (shape and storage), replayed on each
    call.  The first call with a new input warms up, captures (both untimed when the caller
    times that first call apart, as :func:`tokenbench.measure.timed_forward.first_call_s` does) and replays."""
    check_device(dev)
    graphs: dict[tuple, tuple] = {}

    def capture(x: torch.Tensor):
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run(x)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = run(x)
        except RuntimeError as e:  # a host read of a device value while capturing
            raise UserError(f"cannot capture a CUDA graph: {str(e).splitlines()[0][:160]}") from None
        return g, x, out

    def replay(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in graphs:
            graphs[key] = capture(x)
        g, static_in, out = graphs[key]
        if x is not static_in:
            static_in.copy_(x)
        g.replay()
        return out

    return replay
