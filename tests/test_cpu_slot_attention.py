"""H2O's CPU decode kernel (kernels/cpu_slot_attention.py) against float64 and the PyTorch path."""
from __future__ import annotations

import pytest
import torch

from offload_engine.kernels.cpu_attention import library
from offload_engine.kernels.cpu_slot_attention import cpu_slot_attention, slot_attention_reference
from offload_engine.kv.h2o import attend_slots

pytestmark = pytest.mark.skipif(library() is None, reason="the C++ kernel does not build here")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def inputs(dtype, b=3, hq=8, hkv=4, slots=13, capacity=20, d=32, seed=0):
    """Head-major homes with room beyond the attended slots; free slots hold garbage."""
    g = torch.Generator().manual_seed(seed)
    home_k = torch.randn(b, hkv, capacity, d, generator=g).to(dtype)
    home_v = torch.randn(b, hkv, capacity, d, generator=g).to(dtype)
    valid = torch.rand(b, hkv, slots, generator=g) > 0.4
    valid[..., slots // 2] = True
    home_k[:, :, :slots][~valid] = 1e4                      # large but finite: must be skipped, not masked late
    home_v[:, :, :slots][~valid] = float("nan") if dtype == torch.float32 else 1e4
    q = torch.randn(b, hq, d, generator=g).to(dtype) * d ** -0.5
    return q, home_k[:, :, :slots], home_v[:, :, :slots], valid


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 1)])
def test_equals_float64(dtype, hq, hkv):
    q, k, v, valid = inputs(dtype, hq=hq, hkv=hkv, seed=hq + hkv)
    out, probs = cpu_slot_attention(q, k, v, valid)
    ref_out, ref_probs = slot_attention_reference(q, k, v, valid)
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() / ref_out.abs().max() < TOL[dtype]
    assert torch.allclose(probs.double(), ref_probs, atol=1e-6)
    assert torch.allclose(probs.sum(-1).double(), torch.full(probs.shape[:2], float(hq // hkv), dtype=torch.float64))
    assert torch.all(probs[~valid] == 0)


def test_agrees_with_the_pytorch_path():
    q, k, v, valid = inputs(torch.float32, seed=7)
    v = torch.nan_to_num(v)                                 # the PyTorch path multiplies free slots by 0
    out, probs = cpu_slot_attention(q, k, v, valid)
    ref_out, ref_probs = attend_slots(q, k, v, valid)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(probs, ref_probs, atol=1e-6)


def test_bad_input_is_refused():
    q, k, v, valid = inputs(torch.float32)
    with pytest.raises(ValueError, match="valid must be a bool"):
        cpu_slot_attention(q, k, v, valid[:, :, :-1])
    empty = valid.clone()
    empty[0, 0] = False
    with pytest.raises(ValueError, match="at least one"):
        cpu_slot_attention(q, k, v, empty)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        cpu_slot_attention(q[:, :7], k, v, valid)
