"""offload_engine/io/host_return.py: CPU results handed to the GPU through mapped pinned buffers
must arrive bit for bit, as fresh tensors, even while the GPU is still busy with earlier work
when the ring wraps (a buffer is reused only after the GPU has read it)."""
from __future__ import annotations

import pytest
import torch

from offload_engine.io.host_return import MAPPED_LIMIT, HostReturn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_off_the_gpu_it_is_a_plain_move():
    out = torch.randn(3, 1, 4, 8, generator=torch.Generator().manual_seed(0))
    got = HostReturn().to_device(out, torch.device("cpu"))
    assert got.device.type == "cpu" and torch.equal(got, out)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_results_arrive_intact_while_the_gpu_lags(dtype):
    dev = torch.device("cuda")
    ring = HostReturn(depth=2)
    g = torch.Generator().manual_seed(1)
    sources = [torch.randn(4, 1, 7, 64, generator=g).to(dtype) for _ in range(7)]
    results = []
    for src in sources:
        torch.cuda._sleep(20_000_000)  # keep the stream busy: the reads run long after the host writes
        results.append(ring.to_device(src[:, :, :5], dev))  # a non-contiguous view, as attention returns
    for src, got in zip(sources, results):
        assert got.device.type == "cuda" and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.cpu(), src[:, :, :5])
    assert len({r.data_ptr() for r in results}) == len(results)  # fresh tensors, never the ring's memory
    assert len(ring._rings) == 1 and len(next(iter(ring._rings.values()))) == 2


@needs_cuda
def test_large_results_are_copied():
    ring = HostReturn()
    big = torch.randn(MAPPED_LIMIT // 4 + 1, generator=torch.Generator().manual_seed(2))
    got = ring.to_device(big, torch.device("cuda"))
    assert torch.equal(got.cpu(), big) and not ring._rings
