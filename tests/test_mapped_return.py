"""Small host results delivered to the GPU through mapped pinned memory (io/mapped.py)."""
from __future__ import annotations

import pytest
import torch

from offload_engine.io.mapped import MappedReturn

ON_GPU = torch.cuda.is_available()


def test_without_a_gpu_it_is_a_plain_copy():
    ret = MappedReturn(torch.device("cpu"))
    x = torch.randn(3, 5)
    assert not ret.enabled
    assert torch.equal(ret.to_device(x), x)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: mapped host memory")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_each_result_arrives_intact_while_bulk_copies_stream(dtype):
    device = torch.device("cuda")
    ret = MappedReturn(device, depth=2)
    assert ret.enabled
    bulk_src = torch.randn(64 << 20, dtype=torch.float16).pin_memory()
    bulk_dst = torch.empty_like(bulk_src, device=device)
    side = torch.cuda.Stream()
    inputs = [torch.randn(4, 1, 7, 16).to(dtype) for _ in range(7)]   # more than the ring holds
    outputs = []
    for x in inputs:
        with torch.cuda.stream(side):
            bulk_dst.copy_(bulk_src, non_blocking=True)
        y = ret.to_device(x[:, :, 1:])                                # a non-contiguous view too
        outputs.append(y * 1)                                          # consumed on the compute stream
    torch.cuda.synchronize()
    for x, y in zip(inputs, outputs):
        assert y.device.type == "cuda" and y.dtype == dtype
        assert torch.equal(y.cpu(), x[:, :, 1:])
    assert ret.enabled                                                 # the mapped path was used throughout
