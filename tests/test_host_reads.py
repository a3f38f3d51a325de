"""A method whose token counts do not depend on the image reads no tensor value on the host in
its forward: on a GPU every such read (``.item()``, ``nonzero``, a host-to-device copy of an
index made on the CPU) stalls the device, and a CUDA graph cannot capture it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_vit
from tokenbench import registry
from tokenbench.inputs import varies_per_image

HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
              "aten.equal", "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave.Tensor")


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_READS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


VIT_METHODS = [m for m in sorted(registry.load_methods())
               if "vit" in (registry.get_method(m).backbones or ("vit",))]


@pytest.mark.parametrize("name", VIT_METHODS)
def test_a_fixed_count_method_reads_nothing_on_the_host(name):
    cls = registry.get_method(name)
    model = registry.apply(tiny_vit(), name).eval()
    if varies_per_image(cls, model, cls.validate({})):
        pytest.skip("per-image token counts: read on the host by design (refused for CUDA graphs)")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)                    # constants made once are made here
        with _HostReads() as reads:
            model(x)
    assert reads.seen == []
